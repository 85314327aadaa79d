//! `gpdp optout apply`: Type 1 opt-outs registered after collection.
//!
//! A patient who registers a Type 1 opt-out after their data was collected
//! must be deleted, and GPDPR was paused until that was possible. The request
//! list (`nhs_number` per line, optionally `requested_at`) is pseudonymised
//! with the collection key; each patient gets a tombstone (source
//! [`REQUEST_SOURCE`]) and their rows are removed from every table of every
//! practice's batch, including batches from practices they have since left,
//! rewriting only the files that hold them. All of it becomes visible in one
//! manifest commit: a crash at any moment leaves the store as it was, and
//! running the command again completes the work. The audit log gets counts
//! and the proof of deletion (rows and SHA-256 of every file before and
//! after), never a number.
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
use crate::deid::key::CollectionKey;
use crate::deid::pseudonym::{Pseudonym, Pseudonymiser};
use crate::policy::Codec;
use crate::store::delete::{BatchMembers, Deleter, TombstoneBook};
use crate::store::{Store, now_rfc3339};

/// The tombstone source of opt-outs applied with `gpdp optout apply`.
pub const REQUEST_SOURCE: &str = "type1-request";

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
    /// Patient-batch pairs deleted (a patient who moved counts once per practice).
    pub registrations_deleted: u64,
    /// Practice batches that lost rows.
    pub batches_rewritten: u64,
    pub files_rewritten: u64,
    pub rows_removed: BTreeMap<String, u64>,
    /// Seconds from each newly applied request's `requested_at` to completion.
    pub latency_median_seconds: Option<f64>,
    pub latency_max_seconds: Option<f64>,
    pub unchanged: bool,
    pub generation: u64,
    pub seconds: f64,
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

/// Applies the Type 1 requests in `list` to the store.
pub fn apply(
    list: &Path,
    store: &Path,
    key: &Path,
    skip_invalid: bool,
    codec: Codec,
) -> Result<ApplyReport, OptoutError> {
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
    let mut members = BatchMembers::load(&store, |_| true)?;
    let mut next = store.manifest.clone();
    next.key_id = Some(p.key_id());
    let mut deleter = Deleter::new(&store, codec);
    let deleted = deleter.delete_from_batches(&mut next, &mut members, &remove, None)?;

    let mut report = ApplyReport {
        requests: lines,
        pending: invalid.len() as u64,
        patients: requested.len() as u64,
        already_applied: (requested.len() - added.len()) as u64,
        applied: added.len() as u64,
        registrations_deleted: deleted.patients,
        batches_rewritten: deleted
            .proof
            .iter()
            .filter_map(|p| p["practice"].as_str())
            .collect::<HashSet<_>>()
            .len() as u64,
        files_rewritten: deleted.proof.len() as u64,
        rows_removed: deleted.rows_removed.clone(),
        generation: store.manifest.generation,
        ..ApplyReport::default()
    };
    if added.is_empty() && deleted.proof.is_empty() {
        report.unchanged = true;
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    next.tombstones = Some(store.write_tombstones(&book.to_vec(), codec)?);
    let done = Utc::now();
    let mut latencies: Vec<f64> = added
        .iter()
        .filter_map(|id| requested.get(id))
        .map(|at| (done - *at).num_milliseconds().max(0) as f64 / 1000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    report.latency_median_seconds = latencies.get(latencies.len() / 2).copied();
    report.latency_max_seconds = latencies.last().copied();
    next.commit_log = vec![json!({
        "event": "delete",
        "time": now_rfc3339(),
        "reason": "type1_request",
        "source": REQUEST_SOURCE,
        "requests": report.requests,
        "pending": report.pending,
        "tombstones_added": report.applied,
        "already_applied": report.already_applied,
        "patients": deleted.patients,
        "rows_removed": deleted.rows_removed,
        "latency_median_seconds": report.latency_median_seconds,
        "latency_max_seconds": report.latency_max_seconds,
        "proof": deleted.proof,
    })];
    store.commit(next)?;
    report.generation = store.manifest.generation;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// What `gpdp optout apply` has done over the store's life, folded from
/// the audit log's `delete` entries it wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LaterOptouts {
    /// `gpdp optout apply` runs that changed the store.
    pub runs: u64,
    pub patients_deleted: u64,
    pub rows_removed: u64,
    /// Lines pending after the last run (invalid, awaiting correction).
    pub pending: u64,
    pub latency_median_seconds_last_run: Option<f64>,
    pub latency_max_seconds: Option<f64>,
}

/// Type 1 opt-outs applied after collection, from the log's `delete`
/// entries (also the public register's figures).
pub fn later_optouts(log: &[Value]) -> LaterOptouts {
    let mut later = LaterOptouts::default();
    for e in log
        .iter()
        .filter(|e| e["event"] == "delete" && e["reason"] == "type1_request")
    {
        later.runs += 1;
        later.patients_deleted += e["tombstones_added"].as_u64().unwrap_or(0);
        later.rows_removed += e["rows_removed"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        later.pending = e["pending"].as_u64().unwrap_or(0);
        later.latency_median_seconds_last_run = e["latency_median_seconds"].as_f64();
        if let Some(m) = e["latency_max_seconds"].as_f64() {
            later.latency_max_seconds = Some(later.latency_max_seconds.map_or(m, |x| x.max(m)));
        }
    }
    later
}

#[cfg(test)]
mod tests {
    use super::*;

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
