//! The National Data Opt-out list: `gpdp optout ingest`.
//!
//! The NDOO is held centrally against NHS numbers and applied **at
//! dissemination**: collection does not remove these patients (their data
//! may lawfully be used for purposes the opt-out does not cover), but no
//! project whose purpose is research or planning without an exemption may
//! see them. Ingest pseudonymises the list with the collection key, so the
//! store holds only pseudonyms, which the TRE's views anti-join against.
//! Opt-out status is never written onto the patient's own record.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, FixedSizeBinaryArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use serde_json::json;

use super::list::{OptoutError, read_list, refuse_invalid};
use crate::deid::key::CollectionKey;
use crate::deid::pseudonym::{Pseudonym, Pseudonymiser, patient_key};
use crate::policy::Codec;
use crate::store::{Store, StoreError, now_rfc3339, pq_err};

#[derive(Debug, Clone, serde::Serialize)]
pub struct IngestReport {
    pub listed: u64,
    pub invalid: u64,
    /// Distinct patients on the list (after pseudonymisation).
    pub patients: u64,
    pub unchanged: bool,
    pub generation: u64,
    pub seconds: f64,
}

/// Replaces the store's NDOO set with the pseudonyms of `list`, atomically.
/// Idempotent: the same list again changes nothing.
///
/// A list that names nobody, or that loses more than the policy's
/// `max_shrink` of the patients in force, is refused (rules `empty`,
/// `shrink`; [`crate::store::guard`]) unless `accept_shrink`: taking it
/// would make every patient it dropped reachable again in every project
/// the opt-out applies to.
pub fn ingest(
    list: &Path,
    store: &Path,
    key: &Path,
    skip_invalid: bool,
    accept_shrink: bool,
    policy: &crate::policy::CollectionPolicy,
) -> Result<IngestReport, OptoutError> {
    let codec = policy.codec;
    let started = std::time::Instant::now();
    let key = CollectionKey::load(key)?;
    let p = Pseudonymiser::new(&key);
    let (valid, invalid) = read_list(list)?;
    if !skip_invalid {
        refuse_invalid(list, &invalid)?;
    }
    let mut store = Store::open_for_write(store, false)?;
    store.manifest.check_key(&p.key_id())?;
    let ids: BTreeSet<Pseudonym> = valid.iter().map(|n| p.patient(n)).collect();
    let in_force = store.manifest.ndoo.as_ref().map(|e| e.rows);
    let held = if ids.is_empty() {
        Some(crate::store::guard::Held {
            rule: "empty",
            detail: format!(
                "the list names no patient{}",
                in_force.map_or(String::new(), |n| format!(" ({n} in force)"))
            ),
        })
    } else {
        in_force.and_then(|before| {
            crate::store::guard::shrink(&policy.guards, "patients", before, ids.len() as u64)
        })
    };
    let accepted = match held {
        Some(held) if !accept_shrink => {
            return Err(OptoutError::Held {
                path: list.to_owned(),
                held,
            });
        }
        other => other,
    };
    let entry = write_ndoo(&store, &ids, codec)?;
    let mut report = IngestReport {
        listed: (valid.len() + invalid.len()) as u64,
        invalid: invalid.len() as u64,
        patients: ids.len() as u64,
        unchanged: false,
        generation: store.manifest.generation,
        seconds: 0.0,
    };
    if store
        .manifest
        .ndoo
        .as_ref()
        .is_some_and(|old| old.sha256 == entry.sha256)
    {
        let path = store.path(&entry.path);
        std::fs::remove_file(&path).map_err(|e| StoreError::Io { path, source: e })?;
        report.unchanged = true;
    } else {
        let mut next = store.manifest.clone();
        next.key_id = Some(p.key_id());
        let mut line = json!({
            "event": "ndoo_ingest",
            "time": now_rfc3339(),
            "listed": report.listed,
            "invalid": report.invalid,
            "patients": report.patients,
            "sha256": entry.sha256,
        });
        if let Some(held) = &accepted {
            // Taken with --accept-shrink: the log says so, with the counts.
            line["accepted_shrink"] = json!({
                "rule": held.rule,
                "detail": held.detail,
                "patients_in_force": in_force,
                "patients": report.patients,
            });
        }
        next.commit_log = vec![line];
        next.ndoo = Some(entry);
        store.commit(next)?;
        report.generation = store.manifest.generation;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn write_ndoo(
    store: &Store,
    ids: &BTreeSet<Pseudonym>,
    codec: Codec,
) -> Result<crate::store::FileEntry, StoreError> {
    let relative = format!("optouts/ndoo-{:06}.parquet", store.manifest.generation + 1);
    let path = store.path(&relative);
    // patient_key beside the pseudonym: the TRE views filter on the integer
    // (see tre::session).
    let schema = Arc::new(Schema::new(vec![
        Field::new("patient_id", DataType::FixedSizeBinary(32), false),
        Field::new("patient_key", DataType::Int64, false),
    ]));
    let mut w = crate::store::parquet::Writer::create(&path, schema.clone(), codec)
        .map_err(pq_err(&path))?;
    if !ids.is_empty() {
        let array =
            FixedSizeBinaryArray::try_from_iter(ids.iter()).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let keys = Int64Array::from_iter_values(ids.iter().map(patient_key));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(array) as ArrayRef, Arc::new(keys)])
            .map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?;
        w.write(&batch).map_err(pq_err(&path))?;
    }
    w.finish().map_err(pq_err(&path))?;
    store.file_entry(relative)
}
