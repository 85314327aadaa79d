//! Deleting patients from committed batches, with proof.
//!
//! Used by collection (a dissent at one practice deletes the patient from
//! every other practice's batch) and by `gpdp optout apply` (a later Type 1
//! opt-out). Only batches that hold one of the patients are touched, and of
//! those only the files that lose rows are replaced: each is copied without
//! the patients' rows under a new name, and the new name goes into the next
//! manifest, so nothing changes until that manifest is committed. Every
//! replaced file yields a proof entry for the audit log: rows and SHA-256
//! before and after.

use std::collections::{BTreeMap, HashMap, HashSet};

use std::path::Path;

use serde_json::{Value, json};

use super::parquet::{Rewrite, patient_ids, rewrite_without};
use super::{FileEntry, Manifest, Store, StoreError, Tombstone, pq_err};
use crate::deid::pseudonym::{Pseudonym, patient_key};
use crate::digest::hex;
use crate::extract::Table;
use crate::policy::Codec;

/// The patients of committed batches, by practice, as sorted
/// [`patient_key`]s: 8 bytes a patient rather than a set of 32-byte
/// pseudonyms. Collection loads only the batches it does not collect again
/// (a fresh store: none), so its memory does not grow with the store.
///
/// It answers "which of these patients does this batch hold?" without
/// reading the data files. Two patients can share a key only by a 64-bit
/// prefix collision; then a batch is wrongly taken to hold a patient, its
/// files are rewritten, found to lose no rows, and kept as they were
/// ([`Deleter::delete_from_batches`]): a collision costs work, never a
/// missed deletion.
#[derive(Debug, Default)]
pub struct BatchMembers {
    by_practice: HashMap<String, Vec<i64>>,
}

impl BatchMembers {
    /// Reads the members of the committed batches of the practices `wanted`
    /// picks from their `patients` files (every row of a batch belongs to a
    /// patient in it: collection quarantines the rest).
    pub fn load(store: &Store, wanted: impl Fn(&str) -> bool) -> Result<BatchMembers, StoreError> {
        let mut members = BatchMembers::default();
        for (practice, entry) in &store.manifest.batches {
            if !wanted(practice) {
                continue;
            }
            let Some(file) = entry.files.get(Table::Patients.name()) else {
                continue;
            };
            let path = store.path(&file.path);
            let ids = patient_ids(&path).map_err(pq_err(&path))?;
            let mut keys: Vec<i64> = ids.iter().map(patient_key).collect();
            keys.sort_unstable();
            keys.dedup();
            members.by_practice.insert(practice.clone(), keys);
        }
        Ok(members)
    }

    /// Stops tracking `practice`'s batch: no deletion will look at it.
    pub fn forget(&mut self, practice: &str) {
        self.by_practice.remove(practice);
    }

    /// Those of `patients` that `practice`'s batch holds.
    fn held(&self, practice: &str, patients: &HashSet<Pseudonym>) -> HashSet<Pseudonym> {
        let Some(keys) = self.by_practice.get(practice) else {
            return HashSet::new();
        };
        patients
            .iter()
            .filter(|p| keys.binary_search(&patient_key(p)).is_ok())
            .copied()
            .collect()
    }

    /// Forgets `patients` as members of `practice`'s batch.
    fn remove(&mut self, practice: &str, patients: &HashSet<Pseudonym>) {
        if let Some(keys) = self.by_practice.get_mut(practice) {
            let gone: HashSet<i64> = patients.iter().map(patient_key).collect();
            keys.retain(|k| !gone.contains(k));
        }
    }
}

/// What one deletion changed.
#[derive(Debug, Default)]
pub struct Deleted {
    /// Patient-batch pairs removed (a patient in two batches counts twice).
    pub patients: u64,
    /// Rows removed, by table.
    pub rows_removed: BTreeMap<String, u64>,
    /// One entry per replaced file: practice, table, rows and SHA-256 before and after.
    pub proof: Vec<Value>,
    /// Store-relative paths of the files replaced.
    pub replaced: Vec<String>,
}

impl Deleted {
    pub fn absorb(&mut self, other: Deleted) {
        self.patients += other.patients;
        for (t, n) in other.rows_removed {
            *self.rows_removed.entry(t).or_default() += n;
        }
        self.proof.extend(other.proof);
        self.replaced.extend(other.replaced);
    }
}

/// Rewrites files for the store's next generation.
pub struct Deleter<'a> {
    store: &'a Store,
    codec: Codec,
    generation: u64,
    rewrites: usize,
}

impl<'a> Deleter<'a> {
    pub fn new(store: &'a Store, codec: Codec) -> Deleter<'a> {
        Deleter {
            store,
            codec,
            generation: store.manifest.generation + 1,
            rewrites: 0,
        }
    }

    /// Copies the store file `relative` of `table` without the rows of
    /// `remove`, under a new, unique name (a file may be rewritten twice
    /// before one commit); returns that name and the row counts.
    pub fn rewrite(
        &mut self,
        relative: &str,
        table: &str,
        remove: &HashSet<Pseudonym>,
    ) -> Result<(String, Rewrite), StoreError> {
        let new_rel = self.next_name(relative, table);
        let (src, dst) = (self.store.path(relative), self.store.path(&new_rel));
        let rw = rewrite_without(&src, &dst, remove, self.codec).map_err(pq_err(&dst))?;
        Ok((new_rel, rw))
    }

    /// A new, unique store-relative name for a rewrite of `relative` (a file
    /// may be rewritten twice before one commit).
    fn next_name(&mut self, relative: &str, table: &str) -> String {
        let batch = Path::new(relative)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('.').next())
            .unwrap_or("batch");
        self.rewrites += 1;
        format!(
            "tables/{table}/{batch}.g{}r{}.parquet",
            self.generation, self.rewrites
        )
    }

    /// Deletes `remove` from every batch of `next` but `except`'s. `members`
    /// (the patients of each batch) is kept up to date; each affected
    /// batch records the pseudonyms deleted from it. The files are rewritten
    /// in parallel, one per worker.
    pub fn delete_from_batches(
        &mut self,
        next: &mut Manifest,
        members: &mut BatchMembers,
        remove: &HashSet<Pseudonym>,
        except: Option<&str>,
    ) -> Result<Deleted, StoreError> {
        let mut deleted = Deleted::default();
        if remove.is_empty() {
            return Ok(deleted);
        }
        // Plan: which batches hold which of the patients (from `members`,
        // without reading the data files), and every file of those batches.
        let mut hits: BTreeMap<String, HashSet<Pseudonym>> = BTreeMap::new();
        let mut tasks: Vec<(String, String, String, String)> = Vec::new();
        for (practice, entry) in &next.batches {
            if except == Some(practice.as_str()) {
                continue;
            }
            let hit = members.held(practice, remove);
            if hit.is_empty() {
                continue;
            }
            for (table, file) in &entry.files {
                let new_rel = self.next_name(&file.path, table);
                tasks.push((practice.clone(), table.clone(), file.path.clone(), new_rel));
            }
            hits.insert(practice.clone(), hit);
        }
        // Rewrite, in parallel.
        let store = self.store;
        let codec = self.codec;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let results = crate::parallel(&tasks, threads, |(practice, _, src, dst)| {
            let (src, dst) = (store.path(src), store.path(dst));
            rewrite_without(&src, &dst, &hits[practice], codec).map_err(pq_err(&dst))
        });
        // Apply, in order.
        for ((practice, table, _, new_rel), result) in tasks.into_iter().zip(results) {
            let rw = result?;
            let entry = next.batches.get_mut(&practice).expect("planned from next");
            let file = entry.files.get_mut(&table).expect("planned from next");
            if rw.rows_after == rw.rows_before {
                // None of them in this file: keep it as it is.
                let unused = store.path(&new_rel);
                std::fs::remove_file(&unused).map_err(|e| StoreError::Io {
                    path: unused,
                    source: e,
                })?;
                continue;
            }
            *deleted.rows_removed.entry(table.clone()).or_default() +=
                rw.rows_before - rw.rows_after;
            deleted.proof.push(json!({
                "practice": practice, "table": table,
                "rows_before": rw.rows_before, "rows_after": rw.rows_after,
                "sha256_before": file.sha256, "sha256_after": rw.sha256,
            }));
            let new = FileEntry {
                path: new_rel,
                rows: rw.rows_after,
                bytes: rw.bytes,
                sha256: rw.sha256,
            };
            deleted.replaced.push(std::mem::replace(file, new).path);
        }
        for (practice, hit) in hits {
            deleted.patients += hit.len() as u64;
            if let Some(entry) = next.batches.get_mut(&practice) {
                entry.deleted_patients.extend(hit.iter().map(|p| hex(p)));
            }
            members.remove(&practice, &hit);
        }
        Ok(deleted)
    }
}

/// The tombstones, indexed for the commit path: by (source, patient) in
/// order, and by patient for "is this patient deleted?".
pub struct TombstoneBook {
    entries: BTreeMap<(String, Pseudonym), String>,
    active: HashMap<Pseudonym, u32, ahash::RandomState>,
}

impl TombstoneBook {
    pub fn new(tombstones: &[Tombstone]) -> TombstoneBook {
        let mut book = TombstoneBook {
            entries: BTreeMap::new(),
            active: HashMap::default(),
        };
        for t in tombstones {
            book.insert(&t.source, t.patient_id, t.recorded_at.clone());
        }
        book
    }

    fn insert(&mut self, source: &str, p: Pseudonym, at: String) -> bool {
        let fresh = self.entries.insert((source.to_owned(), p), at).is_none();
        if fresh {
            *self.active.entry(p).or_default() += 1;
        }
        fresh
    }

    /// Removes `source`'s tombstones for the patients `lifted` picks; returns how many.
    pub fn lift(&mut self, source: &str, lifted: impl Fn(&Pseudonym) -> bool) -> usize {
        let lifted: Vec<Pseudonym> = self
            .entries
            .range((source.to_owned(), [0u8; 32])..=(source.to_owned(), [0xffu8; 32]))
            .map(|((_, p), _)| *p)
            .filter(|p| lifted(p))
            .collect();
        for p in &lifted {
            self.entries.remove(&(source.to_owned(), *p));
            if let Some(n) = self.active.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    self.active.remove(p);
                }
            }
        }
        lifted.len()
    }

    /// Adds tombstones from `source`; returns the patients newly tombstoned by it.
    pub fn add(&mut self, source: &str, patients: &[Pseudonym], at: &str) -> Vec<Pseudonym> {
        patients
            .iter()
            .filter(|p| self.insert(source, **p, at.to_owned()))
            .copied()
            .collect()
    }

    /// `source`'s tombstones: patient and when it was recorded.
    pub fn of_source<'b>(
        &'b self,
        source: &str,
    ) -> impl Iterator<Item = (Pseudonym, &'b str)> + 'b {
        self.entries
            .range((source.to_owned(), [0u8; 32])..=(source.to_owned(), [0xffu8; 32]))
            .map(|((_, p), at)| (*p, at.as_str()))
    }

    pub fn is_active(&self, p: &Pseudonym) -> bool {
        self.active.contains_key(p)
    }

    pub fn to_vec(&self) -> Vec<Tombstone> {
        self.entries
            .iter()
            .map(|((source, p), at)| Tombstone {
                patient_id: *p,
                source: source.clone(),
                recorded_at: at.clone(),
            })
            .collect()
    }
}
