//! The collection receipt: what one practice's collection took in, let out,
//! held back and why. One JSON file per batch in `STORE/receipts/`; a copy of
//! its counts goes into the audit log.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::store::Manifest;

/// Time spent in each stage of one practice's collection, in seconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StageSeconds {
    /// Hashing the input files to name the batch.
    pub hash_inputs: f64,
    /// The first pass over clinical events for Type 1 codes.
    pub type1: f64,
    /// Reading CSV records and splitting them into fields.
    pub read_parse: f64,
    /// Validating values, generalising dates and postcodes, applying the
    /// exclusions and building Arrow arrays.
    pub validate_generalise: f64,
    /// Computing HMAC pseudonyms (cache misses only).
    pub pseudonymise: f64,
    /// Encoding and writing Parquet.
    pub parquet_write: f64,
}

/// Patients and rows held back because another practice's tombstone covers them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Withheld {
    pub patients: u64,
    pub rows: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Receipt {
    pub practice: String,
    pub batch: String,
    pub key_id: String,
    pub policy_sha256: String,
    pub rows_in: BTreeMap<String, u64>,
    pub rows_out: BTreeMap<String, u64>,
    /// Distinct valid NHS numbers in the patients table.
    pub patients_in: u64,
    /// Distinct patients in the collected patients table.
    pub patients_out: u64,
    /// Patients whose latest Type 1 code at this practice is a dissent.
    pub type1_excluded_patients: u64,
    /// Rows of those patients that stayed behind, per table.
    pub type1_withheld_rows: BTreeMap<String, u64>,
    pub withheld_by_tombstone: Withheld,
    /// Rows quarantined on the practice side, by reason.
    pub quarantined: BTreeMap<String, u64>,
    pub quarantined_by_table: BTreeMap<String, BTreeMap<String, u64>>,
    /// Rows dropped because their code is on an exclusion list, by category.
    pub excluded_codes: BTreeMap<String, u64>,
    /// Columns dropped by policy, per table.
    pub dropped_columns: BTreeMap<String, Vec<String>>,
    /// Columns in the extract files that the extract format does not define:
    /// dropped, never passed through.
    pub unknown_columns: BTreeMap<String, Vec<String>>,
    /// Postcodes the reference lookup did not know (their area is left empty).
    pub unmatched_postcodes: u64,
    /// HMAC computations (one per distinct NHS number in the batch).
    pub pseudonyms_computed: u64,
    /// Pseudonyms sent as deletion notices (Type 1 dissent at this practice).
    pub tombstones_emitted: u64,
    /// Where the quarantined rows are listed (practice side, never the store).
    pub quarantine_file: String,
    pub bytes_in: u64,
    pub started: String,
    pub finished: String,
    pub seconds: f64,
    pub stage_seconds: StageSeconds,
}

impl Receipt {
    pub fn rows_in_total(&self) -> u64 {
        self.rows_in.values().sum()
    }

    pub fn rows_out_total(&self) -> u64 {
        self.rows_out.values().sum()
    }

    pub fn quarantined_total(&self) -> u64 {
        self.quarantined.values().sum()
    }
}

/// Every receipt of the batches in force, as the manifest lists them.
pub fn read_receipts(store: &Path, manifest: &Manifest) -> anyhow::Result<Vec<Receipt>> {
    manifest
        .batches
        .values()
        .map(|b| {
            let path = store.join(&b.receipt);
            let text =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
        })
        .collect()
}
