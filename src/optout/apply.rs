//! `gpdp optout apply`: Type 1 opt-outs registered after collection.
//!
//! A patient who registers a Type 1 opt-out after their data was collected
//! must be deleted, and GPDPR was paused until that was possible. The request
//! list (`nhs_number` per line, optionally `requested_at`) is pseudonymised
//! with the collection key; each patient gets a tombstone (source
//! [`REQUEST_SOURCE`]) and their rows are made unreachable in every table of
//! every practice's batch, including batches from practices they have since
//! left: each file that holds them gets a new deletion vector
//! ([`crate::store::vectors`]) and no data file is rewritten. All of it
//! becomes visible in one manifest commit: a crash at any moment leaves the
//! store as it was, and running the command again completes the work. The
//! audit log gets counts and the proof (per file: rows masked, the vector's
//! SHA-256 and the SHA-256 of the data file it is bound to), never a number.
//!
//! Erasure has two phases: this is the first (request → unreachable);
//! `gpdp optout purge` ([`super::purge`]) erases the bytes later (request →
//! erased), or at once with `--purge`.
//!
//! The tombstone also keeps the patient out of later collections of any
//! practice, until a practice's record shows the opt-out withdrawn on or
//! after the request date (see `collect`): then the patient comes back at
//! that practice's next collection.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Instant;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use serde_json::{Value, json};

use super::list::{OptoutError, read_numbers, refuse_invalid};
use super::purge::{PurgeReport, purge_store};
use crate::deid::key::CollectionKey;
use crate::deid::pseudonym::{Pseudonym, Pseudonymiser};
use crate::policy::Codec;
use crate::store::delete::{BatchMembers, Deleter, TombstoneBook};
use crate::store::{Store, now_rfc3339};

use super::purge::ERASED_BY_COLLECTION;
pub use super::request::REQUEST_SOURCE;
use super::request::median_max;

/// What `optout apply` did, and what is left.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ApplyReport {
    /// Lines in the request list.
    pub requests: u64,
    /// Lines that could not be applied (bad NHS number or date): the backlog
    /// left for someone to correct.
    pub pending: u64,
    /// Distinct patients requested (valid lines).
    pub patients: u64,
    /// Patients whose request was already applied (re-applying is a no-op).
    pub already_applied: u64,
    /// Patients tombstoned by this run.
    pub applied: u64,
    /// Patient-batch pairs made unreachable (a patient who moved counts once per practice).
    pub registrations_deleted: u64,
    /// Practice batches whose data files were rewritten: only by `--purge`
    /// (see `purge`), as `apply` itself writes deletion vectors.
    pub batches_rewritten: u64,
    /// Data files rewritten: only by `--purge`.
    pub files_rewritten: u64,
    /// Rows made unreachable by this run, by table (erased from the bytes
    /// by the purge).
    pub rows_removed: BTreeMap<String, u64>,
    /// Practice batches given a new deletion vector.
    pub batches_masked: u64,
    /// Data files given a new deletion vector (one vector file each).
    pub files_masked: u64,
    /// Seconds from each newly applied request's `requested_at` to the
    /// commit that made the patient unreachable.
    pub latency_median_seconds: Option<f64>,
    pub latency_max_seconds: Option<f64>,
    pub unchanged: bool,
    pub generation: u64,
    pub seconds: f64,
    /// What `--purge` did after (a second commit), if asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purge: Option<PurgeReport>,
}

/// A `requested_at` value: a date (midnight UTC) or an RFC 3339 time, not in the future.
fn parse_requested_at(text: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let at = DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|t| t.and_utc())
        })?;
    (at <= now).then_some(at)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Applies the Type 1 requests in `list` to the store; with `purge`, then
/// purges every file carrying a deletion vector, in a second commit.
pub fn apply(
    list: &Path,
    store: &Path,
    key: &Path,
    skip_invalid: bool,
    codec: Codec,
    purge: bool,
) -> Result<ApplyReport, OptoutError> {
    let started = Instant::now();
    let (mut report, mut store) = apply_only(list, store, key, skip_invalid, codec)?;
    if purge {
        let purged = purge_store(&mut store, 0.0, codec)?;
        report.batches_rewritten = purged.batches_rewritten;
        report.files_rewritten = purged.files_rewritten;
        report.generation = purged.generation;
        report.purge = Some(purged);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn apply_only(
    list: &Path,
    store: &Path,
    key: &Path,
    skip_invalid: bool,
    codec: Codec,
) -> Result<(ApplyReport, Store), OptoutError> {
    let started = Instant::now();
    let now = Utc::now();
    let key = CollectionKey::load(key)?;
    let p = Pseudonymiser::new(&key);
    let (rows, mut invalid) = read_numbers(list, Some("requested_at"))?;
    let lines = (rows.len() + invalid.len()) as u64;
    let mut requested: BTreeMap<Pseudonym, DateTime<Utc>> = BTreeMap::new();
    for (line, nhs, at) in &rows {
        let at = match at.as_deref() {
            None | Some("") => now,
            Some(text) => match parse_requested_at(text, now) {
                Some(at) => at,
                None => {
                    invalid.push((*line, "invalid_requested_at"));
                    continue;
                }
            },
        };
        // The earliest request for a patient counts.
        let entry = requested.entry(p.patient(nhs)).or_insert(at);
        *entry = (*entry).min(at);
    }
    invalid.sort_unstable();
    if !skip_invalid {
        refuse_invalid(list, &invalid)?;
    }
    let mut store = Store::open_for_write(store, false)?;
    store.manifest.check_key(&p.key_id())?;

    let mut book = TombstoneBook::new(&store.tombstones);
    let mut added = Vec::new();
    for (patient, at) in &requested {
        added.extend(book.add(REQUEST_SOURCE, &[*patient], &rfc3339(*at)));
    }
    let remove: HashSet<Pseudonym> = requested.keys().copied().collect();
    let mut members = BatchMembers::load(&store, |_| true, Some(&remove))?;
    let mut next = store.manifest.clone();
    next.key_id = Some(p.key_id());
    let mut deleter = Deleter::new(&store, codec);
    let masked = deleter.mask_in_batches(&mut next, &mut members, &remove)?;

    let mut report = ApplyReport {
        requests: lines,
        pending: invalid.len() as u64,
        patients: requested.len() as u64,
        already_applied: (requested.len() - added.len()) as u64,
        applied: added.len() as u64,
        registrations_deleted: masked.patients,
        batches_masked: masked
            .proof
            .iter()
            .filter_map(|p| p["practice"].as_str())
            .collect::<HashSet<_>>()
            .len() as u64,
        files_masked: masked.proof.len() as u64,
        rows_removed: masked.rows_masked.clone(),
        generation: store.manifest.generation,
        ..ApplyReport::default()
    };
    if added.is_empty() && masked.proof.is_empty() {
        report.unchanged = true;
        report.seconds = started.elapsed().as_secs_f64();
        return Ok((report, store));
    }
    next.tombstones = Some(store.write_tombstones(&book.to_vec(), codec)?);
    let done = Utc::now();
    let (median, max) = median_max(
        added
            .iter()
            .filter_map(|id| requested.get(id))
            .map(|at| (done - *at).num_milliseconds().max(0) as f64 / 1000.0)
            .collect(),
    );
    report.latency_median_seconds = median;
    report.latency_max_seconds = max;
    next.commit_log = vec![json!({
        "event": "delete",
        "time": now_rfc3339(),
        "reason": "type1_request",
        "source": REQUEST_SOURCE,
        "requests": report.requests,
        "pending": report.pending,
        "tombstones_added": report.applied,
        "already_applied": report.already_applied,
        "patients": masked.patients,
        // Rows made unreachable (masked), as `rows_masked`; the purge
        // erases them from the bytes.
        "rows_removed": masked.rows_masked,
        "erasure": ERASURE_BY_VECTORS,
        "files_masked": report.files_masked,
        "rows_masked": masked.rows_masked,
        "latency_median_seconds": report.latency_median_seconds,
        "latency_max_seconds": report.latency_max_seconds,
        "proof": masked.proof,
    })];
    store.commit(next)?;
    store.tombstones = book.to_vec();
    report.generation = store.manifest.generation;
    report.seconds = started.elapsed().as_secs_f64();
    Ok((report, store))
}

/// The `erasure` of a `delete` entry whose rows were masked by deletion
/// vectors (erased later by a `purge` entry). A `delete` entry without it
/// rewrote the files: its patients were erased at once.
pub const ERASURE_BY_VECTORS: &str = "deletion_vectors";

/// What `gpdp optout apply` and `gpdp optout purge` have done over the
/// store's life, folded from the audit log's `delete` and `purge` entries.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LaterOptouts {
    /// `gpdp optout apply` runs that changed the store.
    pub runs: u64,
    /// Patients made unreachable (tombstoned by a request).
    pub patients_deleted: u64,
    /// Rows made unreachable.
    pub rows_removed: u64,
    /// Lines pending after the last run (invalid, awaiting correction).
    pub pending: u64,
    /// Request → unreachable: the median of the last run, the longest of all.
    pub latency_median_seconds_last_run: Option<f64>,
    pub latency_max_seconds: Option<f64>,
    /// `gpdp optout purge` runs that erased rows.
    pub purges: u64,
    /// Patients whose rows are all erased from the bytes: by a purge, or by
    /// a collection whose commit took the last files masking them out of
    /// force (a `purge` entry `"by": "collect"`); a run of a gpdp that
    /// rewrote files at once counts its patients here too.
    pub patients_erased: u64,
    /// Rows erased from the bytes (by purges and collections alike).
    pub rows_erased: u64,
    /// Request → erased: the median of the last erasure that erased a
    /// patient (a purge's or a collection's), the longest of all.
    pub latency_erased_median_seconds_last_purge: Option<f64>,
    pub latency_erased_max_seconds: Option<f64>,
}

/// Type 1 opt-outs applied after collection, from the log's `delete` and
/// `purge` entries — a collection's `purge` entry (`"by": "collect"`)
/// counts its erasures and latencies but not as a purge run — (also the
/// public register's figures).
pub fn later_optouts(log: &[Value]) -> LaterOptouts {
    let mut later = LaterOptouts::default();
    let max = |into: &mut Option<f64>, v: Option<f64>| {
        if let Some(m) = v {
            *into = Some(into.map_or(m, |x| x.max(m)));
        }
    };
    for e in log.iter().filter(|e| e["reason"] == "type1_request") {
        let rows = e["rows_removed"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        if e["event"] == "delete" {
            later.runs += 1;
            let patients = e["tombstones_added"].as_u64().unwrap_or(0);
            later.patients_deleted += patients;
            later.rows_removed += rows;
            later.pending = e["pending"].as_u64().unwrap_or(0);
            later.latency_median_seconds_last_run = e["latency_median_seconds"].as_f64();
            max(
                &mut later.latency_max_seconds,
                e["latency_max_seconds"].as_f64(),
            );
            if e["erasure"] != ERASURE_BY_VECTORS {
                // Rewritten at once: unreachable and erased in one commit.
                later.patients_erased += patients;
                later.rows_erased += rows;
                if patients > 0 {
                    later.latency_erased_median_seconds_last_purge =
                        e["latency_median_seconds"].as_f64();
                }
                max(
                    &mut later.latency_erased_max_seconds,
                    e["latency_max_seconds"].as_f64(),
                );
            }
        } else if e["event"] == "purge" {
            // A collection that erased masked rows counts as erasure, not as a purge run.
            if e["by"] != ERASED_BY_COLLECTION {
                later.purges += 1;
            }
            later.patients_erased += e["patients_erased"].as_u64().unwrap_or(0);
            later.rows_erased += e["rows_erased"]
                .as_object()
                .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
            if e["patients_erased"].as_u64().unwrap_or(0) > 0 {
                later.latency_erased_median_seconds_last_purge =
                    e["latency_erased_median_seconds"].as_f64();
            }
            max(
                &mut later.latency_erased_max_seconds,
                e["latency_erased_max_seconds"].as_f64(),
            );
        }
    }
    later
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_optouts_fold_both_phases_and_count_a_rewriting_run_as_erased() {
        let log = vec![
            // A run of a gpdp that rewrote files: unreachable and erased at once.
            json!({"event": "delete", "reason": "type1_request", "tombstones_added": 2,
                   "rows_removed": {"patients": 2}, "pending": 0,
                   "latency_median_seconds": 5.0, "latency_max_seconds": 9.0}),
            json!({"event": "delete", "reason": "type1_request", "tombstones_added": 3,
                   "rows_removed": {"patients": 3, "clinical_events": 7}, "pending": 1,
                   "erasure": ERASURE_BY_VECTORS,
                   "latency_median_seconds": 1.0, "latency_max_seconds": 2.0}),
            json!({"event": "delete", "reason": "type1_dissent", "tombstones_added": 50}),
            json!({"event": "purge", "reason": "type1_request", "patients_erased": 3,
                   "rows_erased": {"patients": 3, "clinical_events": 7},
                   "latency_erased_median_seconds": 60.0, "latency_erased_max_seconds": 61.0}),
            // Collection erased the rest of a masked run: erasure, not a purge run.
            json!({"event": "delete", "reason": "type1_request", "tombstones_added": 1,
                   "rows_removed": {"patients": 1}, "pending": 0,
                   "erasure": ERASURE_BY_VECTORS,
                   "latency_median_seconds": 3.0, "latency_max_seconds": 3.0}),
            json!({"event": "purge", "reason": "type1_request", "by": ERASED_BY_COLLECTION,
                   "patients_erased": 1, "rows_erased": {"patients": 1},
                   "latency_erased_median_seconds": 70.0, "latency_erased_max_seconds": 70.0}),
            // A collection that dropped vectors of patients still masked elsewhere.
            json!({"event": "purge", "reason": "type1_request", "by": ERASED_BY_COLLECTION,
                   "patients_erased": 0, "rows_erased": {"clinical_events": 2},
                   "latency_erased_median_seconds": null, "latency_erased_max_seconds": null}),
        ];
        let l = later_optouts(&log[..4]);
        assert_eq!(
            (l.runs, l.patients_deleted, l.rows_removed, l.pending),
            (2, 5, 12, 1)
        );
        assert_eq!(
            (l.latency_median_seconds_last_run, l.latency_max_seconds),
            (Some(1.0), Some(9.0))
        );
        assert_eq!((l.purges, l.patients_erased, l.rows_erased), (1, 5, 12));
        assert_eq!(
            (
                l.latency_erased_median_seconds_last_purge,
                l.latency_erased_max_seconds
            ),
            (Some(60.0), Some(61.0))
        );
        // A collection's erasure counts, with its latency, but is no purge run.
        let l = later_optouts(&log);
        assert_eq!((l.runs, l.patients_deleted), (3, 6));
        assert_eq!((l.purges, l.patients_erased, l.rows_erased), (1, 6, 15));
        assert_eq!(
            (
                l.latency_erased_median_seconds_last_purge,
                l.latency_erased_max_seconds
            ),
            (Some(70.0), Some(70.0))
        );
        // Before the purge, the masked run is unreachable, not erased.
        let l = later_optouts(&log[..3]);
        assert_eq!(
            (l.patients_erased, l.latency_erased_max_seconds),
            (2, Some(9.0))
        );
    }

    #[test]
    fn requested_at_is_a_date_or_a_time_not_in_the_future() {
        let now = "2026-11-23T12:00:00Z".parse::<DateTime<Utc>>().unwrap();
        assert_eq!(
            parse_requested_at("2026-11-20", now)
                .map(rfc3339)
                .as_deref(),
            Some("2026-11-20T00:00:00.000Z")
        );
        assert!(parse_requested_at("2026-11-23T11:00:00+00:00", now).is_some());
        assert!(parse_requested_at("2026-11-24", now).is_none());
        assert!(parse_requested_at("20/11/2026", now).is_none());
    }
}
