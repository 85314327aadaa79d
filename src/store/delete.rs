//! Deleting patients from committed batches, with proof.
//!
//! Used by collection (a dissent at one practice deletes the patient from
//! every other practice's batch), by `gpdp optout apply` (a later Type 1
//! opt-out) and by `gpdp optout purge`. Only batches that hold one of the
//! patients are touched, and of those only the files that lose rows.
//!
//! Two ways to delete. [`Deleter::delete_from_batches`] copies each file
//! without the patients' rows under a new name (and without the rows its
//! deletion vector masked: the copy carries no vector). [`Deleter::mask_in_batches`]
//! leaves the data files as they are and writes, per file, a new deletion
//! vector — the old one's positions and the patients' — under a new name
//! ([`super::vectors`]); `gpdp optout purge` erases the bytes later. Either
//! way the new names go into the next manifest, so nothing changes until
//! that manifest is committed, and every file yields a proof entry for the
//! audit log: rows and SHA-256 before and after, or the rows masked, the
//! vector's SHA-256 and the data file's it is bound to.
//!
//! A commit that takes a data file with a vector out of force — the
//! batch collected again, or the file rewritten — erases the rows the
//! vector masked with it; [`dropped_vectors`] says which, and which
//! patients that leaves with no masked row anywhere, for the same commit's
//! log.

use std::collections::{BTreeMap, HashMap, HashSet};

use std::path::Path;

use serde_json::{Value, json};

use super::parquet::{
    Rewrite, masked_patients, patient_keys, positions_of, rewrite_without, vector,
};
use super::vectors::{self, DeletionVector};
use super::{BatchEntry, FileEntry, Manifest, Store, StoreError, Tombstone, pq_err};
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
    /// patient in it: collection quarantines the rest), one file per
    /// worker. A patient whose rows a deletion vector masks is no longer a
    /// member. With `only`, just those patients are kept: a deletion of a
    /// few patients need not hold, nor sort, every patient's key.
    pub fn load(
        store: &Store,
        wanted: impl Fn(&str) -> bool,
        only: Option<&HashSet<Pseudonym>>,
    ) -> Result<BatchMembers, StoreError> {
        let only: Option<HashSet<i64>> = only.map(|o| o.iter().map(patient_key).collect());
        let files: Vec<(&String, &BatchEntry)> = store
            .manifest
            .batches
            .iter()
            .filter(|(practice, entry)| {
                wanted(practice) && entry.files.contains_key(Table::Patients.name())
            })
            .collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let read = crate::parallel(&files, threads, |&(practice, entry)| {
            let file = &entry.files[Table::Patients.name()];
            let path = store.path(&file.path);
            let dv = vector(store.root(), entry, Table::Patients.name())?;
            let mut keys = patient_keys(&path, dv.as_ref()).map_err(pq_err(&path))?;
            if let Some(only) = &only {
                keys.retain(|k| only.contains(k));
            }
            keys.sort_unstable();
            keys.dedup();
            Ok::<_, StoreError>((practice.clone(), keys))
        });
        let mut members = BatchMembers::default();
        for r in read {
            let (practice, keys) = r?;
            members.by_practice.insert(practice, keys);
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
    /// before one commit); returns that name and the row counts. If the
    /// manifest in force gives the file a deletion vector, its masked rows
    /// are dropped too (the copy needs no vector).
    pub fn rewrite(
        &mut self,
        relative: &str,
        table: &str,
        remove: &HashSet<Pseudonym>,
    ) -> Result<(String, Rewrite), StoreError> {
        let dv = match self
            .store
            .manifest
            .batches
            .values()
            .find(|b| b.files.get(table).is_some_and(|f| f.path == relative))
        {
            Some(batch) => vector(self.store.root(), batch, table)?,
            None => None,
        };
        let new_rel = self.next_name(relative, table);
        let (src, dst) = (self.store.path(relative), self.store.path(&new_rel));
        let rw =
            rewrite_without(&src, &dst, remove, dv.as_ref(), self.codec).map_err(pq_err(&dst))?;
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

    /// Makes `remove` unreachable in every batch of `next` without
    /// rewriting a data file: each file of a batch that holds one of them
    /// gets a new deletion vector, the union of its old one and the
    /// positions of their rows, written and fsynced under a new name
    /// (`tables/<table>/<data-file-stem>.v<generation>.dv`). `members` is
    /// kept up to date; each affected batch records the pseudonyms deleted
    /// from it. Files are scanned in parallel, one per worker.
    pub fn mask_in_batches(
        &mut self,
        next: &mut Manifest,
        members: &mut BatchMembers,
        remove: &HashSet<Pseudonym>,
    ) -> Result<Masked, StoreError> {
        let mut masked = Masked::default();
        if remove.is_empty() {
            return Ok(masked);
        }
        let mut hits: BTreeMap<String, HashSet<Pseudonym>> = BTreeMap::new();
        let mut tasks: Vec<(String, String, FileEntry, Option<DeletionVector>)> = Vec::new();
        for (practice, entry) in &next.batches {
            let hit = members.held(practice, remove);
            if hit.is_empty() {
                continue;
            }
            for (table, file) in &entry.files {
                let dv = vector(self.store.root(), entry, table)?;
                tasks.push((practice.clone(), table.clone(), file.clone(), dv));
            }
            hits.insert(practice.clone(), hit);
        }
        let store = self.store;
        let generation = self.generation;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let results = crate::parallel(&tasks, threads, |(practice, table, file, old)| {
            let path = store.path(&file.path);
            let found = positions_of(&path, &hits[practice]).map_err(pq_err(&path))?;
            let corrupt = || StoreError::Corrupt {
                path: path.clone(),
                message: "a row position past the file's footer row count".into(),
            };
            let dv = match old {
                Some(old) => old.with(found).ok_or_else(corrupt)?,
                None => DeletionVector::new(file, found).ok_or_else(corrupt)?,
            };
            let added = dv.masked_rows() - old.as_ref().map_or(0, DeletionVector::masked_rows);
            if added == 0 {
                return Ok(None);
            }
            let relative = vector_name(&file.path, table, generation);
            let entry = vectors::write(store.root(), &relative, &dv)?;
            Ok::<_, StoreError>(Some((entry, added, dv.masked_rows())))
        });
        for ((practice, table, file, _), result) in tasks.into_iter().zip(results) {
            let Some((new, added, total)) = result? else {
                continue;
            };
            let entry = next.batches.get_mut(&practice).expect("planned from next");
            *masked.rows_masked.entry(table.clone()).or_default() += added;
            let mut proof = json!({
                "practice": practice, "table": table,
                "rows": file.rows, "rows_masked": added, "rows_masked_total": total,
                "sha256": file.sha256,
                "vector": new.path, "vector_sha256": new.sha256,
            });
            if let Some(old) = entry.vectors.insert(table.clone(), new) {
                proof["vector_sha256_before"] = json!(old.sha256);
            }
            masked.proof.push(proof);
        }
        masked.patients = record_deleted(next, members, hits);
        Ok(masked)
    }

    /// Erases the rows the deletion vectors of `next` mask: every file
    /// whose vector masks at least `min_share` of its rows is rewritten
    /// without them, under a new name, and loses its vector; the others
    /// keep theirs. Files are rewritten in parallel, one per worker.
    pub fn purge(&mut self, next: &mut Manifest, min_share: f64) -> Result<Purged, StoreError> {
        let mut tasks: Vec<(String, String, String, String, DeletionVector)> = Vec::new();
        let mut kept: Vec<(String, DeletionVector)> = Vec::new();
        for (practice, entry) in &next.batches {
            for table in entry.vectors.keys() {
                let Some(dv) = vector(self.store.root(), entry, table)? else {
                    continue;
                };
                let file = &entry.files[table];
                if dv.deleted_share() >= min_share {
                    let new_rel = self.next_name(&file.path, table);
                    tasks.push((
                        practice.clone(),
                        table.clone(),
                        file.path.clone(),
                        new_rel,
                        dv,
                    ));
                } else {
                    kept.push((file.path.clone(), dv));
                }
            }
        }
        let store = self.store;
        let codec = self.codec;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let results = crate::parallel(&tasks, threads, |(_, _, src, dst, dv)| {
            let (src, dst) = (store.path(src), store.path(dst));
            let who = masked_patients(&src, dv).map_err(pq_err(&src))?;
            let rw = rewrite_without(&src, &dst, &HashSet::new(), Some(dv), codec)
                .map_err(pq_err(&dst))?;
            Ok::<_, StoreError>((rw, who))
        });
        // The patients some vector still masks are not erased yet.
        let still = crate::parallel(&kept, threads, |(src, dv)| {
            let src = store.path(src);
            masked_patients(&src, dv).map_err(pq_err(&src))
        });
        let mut purged = Purged {
            vectors_kept: kept.len() as u64,
            ..Purged::default()
        };
        let mut batches = HashSet::new();
        for ((practice, table, _, new_rel, _), result) in tasks.into_iter().zip(results) {
            let (rw, who) = result?;
            purged.erased.extend(who);
            let entry = next.batches.get_mut(&practice).expect("planned from next");
            let vector = entry
                .vectors
                .remove(&table)
                .expect("planned from its vector");
            let file = entry.files.get_mut(&table).expect("planned from next");
            *purged.rows_erased.entry(table.clone()).or_default() += rw.rows_masked;
            purged.proof.push(json!({
                "practice": practice, "table": table,
                "rows_before": rw.rows_before, "rows_after": rw.rows_after,
                "rows_masked": rw.rows_masked,
                "sha256_before": file.sha256, "sha256_after": rw.sha256,
                "vector_sha256_before": vector.sha256,
            }));
            let new = rewritten(new_rel, rw);
            purged.replaced.push(std::mem::replace(file, new).path);
            purged.replaced.push(vector.path);
            batches.insert(practice);
        }
        for s in still {
            for p in s? {
                purged.erased.remove(&p);
            }
        }
        purged.batches = batches.len() as u64;
        Ok(purged)
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
        // without reading the data files), and every file of those batches
        // with its deletion vector (a rewrite drops the masked rows too).
        let mut hits: BTreeMap<String, HashSet<Pseudonym>> = BTreeMap::new();
        let mut tasks: Vec<(String, String, String, String, Option<DeletionVector>)> = Vec::new();
        for (practice, entry) in &next.batches {
            if except == Some(practice.as_str()) {
                continue;
            }
            let hit = members.held(practice, remove);
            if hit.is_empty() {
                continue;
            }
            for (table, file) in &entry.files {
                let dv = vector(self.store.root(), entry, table)?;
                let new_rel = self.next_name(&file.path, table);
                tasks.push((
                    practice.clone(),
                    table.clone(),
                    file.path.clone(),
                    new_rel,
                    dv,
                ));
            }
            hits.insert(practice.clone(), hit);
        }
        // Rewrite, in parallel.
        let store = self.store;
        let codec = self.codec;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let results = crate::parallel(&tasks, threads, |(practice, _, src, dst, dv)| {
            let (src, dst) = (store.path(src), store.path(dst));
            rewrite_without(&src, &dst, &hits[practice], dv.as_ref(), codec).map_err(pq_err(&dst))
        });
        // Apply, in order.
        for ((practice, table, _, new_rel, _), result) in tasks.into_iter().zip(results) {
            let rw = result?;
            let entry = next.batches.get_mut(&practice).expect("planned from next");
            if rw.rows_removed() == 0 {
                // None of them in this file: keep it as it is (with its vector).
                let unused = store.path(&new_rel);
                std::fs::remove_file(&unused).map_err(|e| StoreError::Io {
                    path: unused,
                    source: e,
                })?;
                continue;
            }
            *deleted.rows_removed.entry(table.clone()).or_default() += rw.rows_removed();
            // The old file's vector goes with it: its masked rows are erased.
            let old_vector = entry.vectors.remove(&table);
            let file = entry.files.get_mut(&table).expect("planned from next");
            let mut proof = json!({
                "practice": practice, "table": table,
                "rows_before": rw.rows_before, "rows_after": rw.rows_after,
                "sha256_before": file.sha256, "sha256_after": rw.sha256,
            });
            if let Some(old) = old_vector {
                proof["rows_masked"] = json!(rw.rows_masked);
                proof["vector_sha256_before"] = json!(old.sha256);
            }
            deleted.proof.push(proof);
            let new = rewritten(new_rel, rw);
            deleted.replaced.push(std::mem::replace(file, new).path);
        }
        deleted.patients = record_deleted(next, members, hits);
        Ok(deleted)
    }
}

/// Records in `next` that each batch of `hits` lost its patients there,
/// and forgets them as members of it in `members`; returns the
/// patient-batch pairs (a patient in two batches counts twice).
fn record_deleted(
    next: &mut Manifest,
    members: &mut BatchMembers,
    hits: BTreeMap<String, HashSet<Pseudonym>>,
) -> u64 {
    let mut pairs = 0;
    for (practice, hit) in hits {
        pairs += hit.len() as u64;
        if let Some(entry) = next.batches.get_mut(&practice) {
            entry.deleted_patients.extend(hit.iter().map(|p| hex(p)));
        }
        members.remove(&practice, &hit);
    }
    pairs
}

/// The manifest entry of a file rewritten as `path`.
fn rewritten(path: String, rw: Rewrite) -> FileEntry {
    FileEntry {
        path,
        rows: rw.rows_after,
        bytes: rw.bytes,
        sha256: rw.sha256,
    }
}

/// A deletion vector's store-relative name: beside its data file, named
/// after it and the generation that commits it (vectors are immutable: a
/// later opt-out in the same file writes a new one).
pub fn vector_name(data: &str, table: &str, generation: u64) -> String {
    let stem = Path::new(data)
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".parquet"))
        .unwrap_or("batch");
    format!("tables/{table}/{stem}.v{generation}.dv")
}

/// The deletion vectors of the manifest in force whose data files `next`
/// no longer has in force — a batch collected again, or a file rewritten
/// without its patients (and the rows its vector masked) — and who they
/// erase: the masked rows are gone with those files, so a patient masked
/// there and by no vector of `next` has no row left anywhere. Only the
/// dropped vectors' files are read, and of the vectors `next` keeps only
/// those of batches whose `deleted_patients` name one of those patients
/// (a vector masks only patients deleted from its batch). Relies on the
/// dropped files still being on disk: call it before `next` is committed.
pub fn dropped_vectors(store: &Store, next: &Manifest) -> Result<Dropped, StoreError> {
    let mut dropped = Dropped::default();
    let mut tasks: Vec<(String, String, FileEntry, FileEntry, DeletionVector)> = Vec::new();
    for (practice, entry) in &store.manifest.batches {
        for (table, vector_file) in &entry.vectors {
            let data = &entry.files[table];
            let in_force = next
                .batches
                .get(practice)
                .and_then(|b| b.files.get(table))
                .is_some_and(|f| f.path == data.path);
            if in_force {
                // Same data file: its vector is kept (or grown), not dropped.
                continue;
            }
            let Some(dv) = vector(store.root(), entry, table)? else {
                continue;
            };
            tasks.push((
                practice.clone(),
                table.clone(),
                data.clone(),
                vector_file.clone(),
                dv,
            ));
        }
    }
    if tasks.is_empty() {
        return Ok(dropped);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let results = crate::parallel(&tasks, threads, |(_, _, data, _, dv)| {
        let path = store.path(&data.path);
        masked_patients(&path, dv).map_err(pq_err(&path))
    });
    for ((practice, table, data, vector_file, dv), result) in tasks.into_iter().zip(results) {
        dropped.erased.extend(result?);
        *dropped.rows_erased.entry(table.clone()).or_default() += dv.masked_rows();
        dropped.proof.push(json!({
            "practice": practice, "table": table,
            "rows": data.rows, "rows_masked": dv.masked_rows(), "sha256": data.sha256,
            "vector_sha256_before": vector_file.sha256,
        }));
    }
    // The patients some vector of `next` still masks are not erased yet.
    let erased_hex: Vec<String> = dropped.erased.iter().map(|p| hex(p)).collect();
    let mut kept: Vec<(String, DeletionVector)> = Vec::new();
    for entry in next.batches.values() {
        if entry.vectors.is_empty()
            || !erased_hex
                .iter()
                .any(|h| entry.deleted_patients.contains(h))
        {
            continue;
        }
        for table in entry.vectors.keys() {
            if let Some(dv) = vector(store.root(), entry, table)? {
                kept.push((entry.files[table].path.clone(), dv));
            }
        }
    }
    let still = crate::parallel(&kept, threads, |(src, dv)| {
        let src = store.path(src);
        masked_patients(&src, dv).map_err(pq_err(&src))
    });
    for s in still {
        for p in s? {
            dropped.erased.remove(&p);
        }
    }
    Ok(dropped)
}

/// What the vectors a commit drops erased ([`dropped_vectors`]).
#[derive(Debug, Default)]
pub struct Dropped {
    /// Masked rows erased with their files, by table.
    pub rows_erased: BTreeMap<String, u64>,
    /// One entry per dropped vector: practice, table, the data file's rows
    /// and SHA-256, the rows it masked and the vector's SHA-256.
    pub proof: Vec<Value>,
    /// Patients whose masked rows are now all erased (none left under a
    /// vector `next` keeps).
    pub erased: HashSet<Pseudonym>,
}

/// What one masking changed.
#[derive(Debug, Default)]
pub struct Masked {
    /// Patient-batch pairs made unreachable (a patient in two batches counts twice).
    pub patients: u64,
    /// Rows newly masked, by table.
    pub rows_masked: BTreeMap<String, u64>,
    /// One entry per new vector: practice, table, the data file's rows and
    /// SHA-256, rows masked (new and in all), the vector's path and SHA-256
    /// (and its predecessor's).
    pub proof: Vec<Value>,
}

/// What one purge changed.
#[derive(Debug, Default)]
pub struct Purged {
    /// Practice batches with a file rewritten.
    pub batches: u64,
    /// Masked rows erased, by table.
    pub rows_erased: BTreeMap<String, u64>,
    /// One entry per rewritten file: practice, table, rows and SHA-256
    /// before and after, rows masked, and the dropped vector's SHA-256.
    pub proof: Vec<Value>,
    /// Store-relative paths of the files and vectors replaced.
    pub replaced: Vec<String>,
    /// Patients whose masked rows are now all erased (none left under a
    /// vector the purge kept).
    pub erased: HashSet<Pseudonym>,
    /// Vectors left in force (below the threshold).
    pub vectors_kept: u64,
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
