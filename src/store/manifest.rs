//! The manifest: the store's commit point. It names every file in force —
//! each practice's batch and its data files (and their deletion vectors),
//! provider extracts, the tombstones and the NDOO set — with what each
//! should hold (rows, bytes, SHA-256), and the audit entries of the commit
//! that made it. Plain data: reading and committing it is the store's
//! ([`super::Store`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A file the manifest references, with what it should hold.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// Relative to the store root.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// One practice's current batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchEntry {
    pub batch: String,
    pub practice: String,
    pub policy_sha256: String,
    pub collected_at: String,
    pub receipt: String,
    pub files: BTreeMap<String, FileEntry>,
    /// Patients removed from this batch by tombstones since it was collected
    /// (hex pseudonyms). If a tombstone is lifted, re-collecting the same
    /// extract is no longer a no-op: the patient comes back.
    #[serde(default)]
    pub deleted_patients: BTreeSet<String>,
    /// Deletion vectors, by table: the rows of that table's data file that
    /// later opt-outs made unreachable and no purge has erased yet
    /// ([`super::vectors`]). Every reader of the data file must skip them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vectors: BTreeMap<String, FileEntry>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub generation: u64,
    pub key_id: Option<String>,
    pub batches: BTreeMap<String, BatchEntry>,
    pub tombstones: Option<FileEntry>,
    pub ndoo: Option<FileEntry>,
    /// Provider extracts linked in (`gpdp link`), by source (`apcs`,
    /// `ons_deaths`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub linked: BTreeMap<String, LinkedEntry>,
    /// The audit entries of the commit that made this manifest.
    #[serde(default)]
    pub commit_log: Vec<Value>,
}

/// One provider extract's current batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinkedEntry {
    pub batch: String,
    pub policy_sha256: String,
    pub linked_at: String,
    pub receipt: String,
    pub file: FileEntry,
}

impl Manifest {
    /// Every file this manifest puts in force — GP and provider data files,
    /// their deletion vectors, the tombstones and the NDOO set — as path →
    /// SHA-256.
    pub fn files_in_force(&self) -> BTreeMap<String, String> {
        self.all_files()
            .map(|f| (f.path.clone(), f.sha256.clone()))
            .collect()
    }

    /// Every file entry this manifest references.
    pub fn all_files(&self) -> impl Iterator<Item = &FileEntry> {
        self.batches
            .values()
            .flat_map(|b| b.files.values().chain(b.vectors.values()))
            .chain(self.linked.values().map(|l| &l.file))
            .chain(self.tombstones.iter())
            .chain(self.ndoo.iter())
    }
}
