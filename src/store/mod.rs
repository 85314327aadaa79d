//! The store: what has left the practices, de-identified, in Parquet any
//! Arrow tool can read, plus the opt-out lists, receipts and audit log.
//!
//! ```text
//! STORE/manifest.json                      the commit point: batches, files, checksums, key id, generation
//! STORE/tables/<table>/<batch>[.gN].parquet immutable data files (patients, clinical_events, medications)
//! STORE/tables/<table>/<stem>.v<gen>.dv    deletion vectors: rows of one data file later opt-outs made unreachable
//! STORE/optouts/tombstones-<gen>.parquet   deleted pseudonyms: when, why, from where
//! STORE/optouts/tombstones.parquet         a link to the current tombstones file
//! STORE/receipts/<batch>.json              one per practice collection
//! STORE/audit/log.jsonl                    hash-chained audit log
//! ```
//!
//! **Atomicity.** Data files are written under new names, fsynced, and only
//! then referenced by a new `manifest.json`, which replaces the old one with
//! an atomic rename. Until that rename nothing a reader sees has changed; a
//! crash at any point leaves the previous manifest and its files intact, and
//! the next writer deletes whatever no manifest references. Each manifest
//! carries the audit entries of its own commit, so if a crash falls between
//! the rename and the log append, the next writer appends them.
//!
//! **Two-phase erasure.** A later opt-out is first masked: a deletion
//! vector per affected data file ([`vectors`]), which every reader applies
//! ([`parquet::open`]); a purge later rewrites the files without the masked
//! rows ([`delete`]). Vectors are files in force like any other
//! ([`Manifest::all_files`]): written and fsynced before the manifest that
//! names them, removed by the next writer when no manifest does.
//!
//! **One writer.** Writers hold an exclusive lock on `STORE/.lock` for their
//! whole run; readers (the TRE) need no lock because files are never
//! modified in place.

pub mod delete;
pub mod error;
pub mod guard;
pub mod log;
pub mod manifest;
pub mod parquet;
pub mod schema;
pub mod vectors;
pub mod verify;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, FixedSizeBinaryArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use serde_json::Value;

pub use self::error::StoreError;
pub(crate) use self::error::{io_err, pq_err};
use self::log::AuditLog;
pub use self::manifest::{BatchEntry, FileEntry, LinkedEntry, Manifest};
use crate::deid::pseudonym::{Pseudonym, patient_key};
use crate::digest::hex;
use crate::extract::Table;
use crate::policy::Codec;

impl Manifest {
    /// A store accepts only the key it was collected with (any key while
    /// it has none).
    pub fn check_key(&self, given: &str) -> Result<(), StoreError> {
        match &self.key_id {
            Some(existing) if existing != given => Err(StoreError::KeyMismatch {
                store: existing.clone(),
                given: given.to_owned(),
            }),
            _ => Ok(()),
        }
    }
}

/// Every table of the store, GP and provider: `tables/<name>/`.
fn table_names() -> impl Iterator<Item = &'static str> {
    Table::ALL
        .iter()
        .map(|t| t.name())
        .chain(crate::extract::Source::ALL.iter().map(|s| s.name()))
}

/// One digest of a set of files in force: SHA-256 over `path\tsha256\n`
/// lines in path order. The `commit` entry of every generation carries it,
/// so an auditor replaying the log's file changes can check each step.
pub fn in_force_digest(files: &BTreeMap<String, String>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (path, sha) in files {
        ctx.update(path.as_bytes());
        ctx.update(b"\t");
        ctx.update(sha.as_bytes());
        ctx.update(b"\n");
    }
    hex(ctx.finish().as_ref())
}

/// The `commit` audit entry that goes with every new generation: which
/// files it put in force or took out (`null`), and a digest of all of them.
/// Replayed from the first generation, these entries say which files the
/// log holds to be in force, whatever the manifest on disk says — the check
/// that catches a store restored from a backup (`gpdp audit`'s
/// `no_rollback`).
fn commit_entry(before: &Manifest, after: &Manifest) -> Value {
    let (old, new) = (before.files_in_force(), after.files_in_force());
    let mut changed = serde_json::Map::new();
    for (path, sha) in &new {
        if old.get(path) != Some(sha) {
            changed.insert(path.clone(), Value::from(sha.as_str()));
        }
    }
    for path in old.keys().filter(|p| !new.contains_key(*p)) {
        changed.insert(path.clone(), Value::Null);
    }
    serde_json::json!({
        "event": "commit",
        "time": now_rfc3339(),
        "files_changed": changed,
        "files_in_force": new.len(),
        "in_force_sha256": in_force_digest(&new),
    })
}

/// One tombstone: this patient's data must not be in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    pub patient_id: Pseudonym,
    /// Who asked: `type1:<ODS>` (dissent found at collection) or
    /// `type1-request:<name>` (a later opt-out applied with `gpdp optout apply`).
    pub source: String,
    pub recorded_at: String,
}

pub struct Store {
    root: PathBuf,
    _lock: File,
    pub manifest: Manifest,
    pub tombstones: Vec<Tombstone>,
}

pub fn sha256_file(path: &Path) -> Result<(String, u64), StoreError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = std::io::Read::read(&mut file, &mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex(ctx.finish().as_ref()), len))
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Whether `root` holds a store (a committed manifest).
pub fn is_store(root: &Path) -> bool {
    root.join("manifest.json").is_file()
}

/// Reads the manifest of a store without taking the writer's lock (readers).
pub fn read_manifest(root: &Path) -> Result<Manifest, StoreError> {
    let path = root.join("manifest.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::NotAStore(root.to_owned()));
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
        path,
        message: e.to_string(),
    })
}

impl Store {
    /// Opens (creating if `create`) a store for writing: takes the lock,
    /// finishes an interrupted commit's log, removes unreferenced files.
    pub fn open_for_write(root: &Path, create: bool) -> Result<Store, StoreError> {
        if !create && !root.join("manifest.json").exists() {
            return Err(StoreError::NotAStore(root.to_owned()));
        }
        let tables = table_names().map(|t| Path::new("tables").join(t));
        for d in ["optouts", "receipts", "audit"]
            .iter()
            .map(PathBuf::from)
            .chain(tables)
        {
            let d = root.join(d);
            std::fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let lock_path = root.join(".lock");
        let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
        lock.lock().map_err(io_err(&lock_path))?;
        let manifest = match read_manifest(root) {
            Ok(m) => m,
            Err(StoreError::NotAStore(_)) => Manifest {
                format: 1,
                ..Manifest::default()
            },
            Err(e) => return Err(e),
        };
        let mut store = Store {
            root: root.to_owned(),
            _lock: lock,
            manifest,
            tombstones: Vec::new(),
        };
        store.recover()?;
        store.tombstones = store.read_tombstones()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn audit(&self) -> AuditLog {
        AuditLog::at(&self.root)
    }

    /// Appends the last commit's audit entries if a crash lost them, points
    /// the tombstones link at the current file, and deletes files that no
    /// manifest references (left by an interrupted write).
    fn recover(&mut self) -> Result<(), StoreError> {
        let log = self.audit();
        let logged = log.verify()?.last_generation;
        if self.manifest.generation > logged && !self.manifest.commit_log.is_empty() {
            let mut entries = self.manifest.commit_log.clone();
            for e in &mut entries {
                if let Some(o) = e.as_object_mut() {
                    o.insert("recovered".into(), Value::Bool(true));
                }
            }
            log.append(&entries)?;
        }
        self.link_tombstones()?;
        self.collect_garbage()
    }

    fn referenced(&self) -> HashSet<PathBuf> {
        self.manifest
            .all_files()
            .map(|f| self.root.join(&f.path))
            .collect()
    }

    /// Deletes data files that the manifest does not reference. Only safe
    /// when nothing is being staged: at open, and after a failed run.
    pub fn collect_garbage(&self) -> Result<(), StoreError> {
        let keep = self.referenced();
        let mut dirs = vec![self.root.join("optouts")];
        dirs.extend(table_names().map(|t| self.root.join("tables").join(t)));
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                let path = entry.path();
                let is_link = path
                    .file_name()
                    .is_some_and(|n| n == "tombstones.parquet" || n == "ndoo.parquet");
                if !is_link && !keep.contains(&path) {
                    std::fs::remove_file(&path).map_err(io_err(&path))?;
                }
            }
        }
        Ok(())
    }

    /// `optouts/tombstones.parquet` (and `ndoo.parquet`) always point at the
    /// current generation's file, for people browsing the store.
    fn link_tombstones(&self) -> Result<(), StoreError> {
        for (entry, name) in [
            (&self.manifest.tombstones, "tombstones.parquet"),
            (&self.manifest.ndoo, "ndoo.parquet"),
        ] {
            let link = self.root.join("optouts").join(name);
            let Some(entry) = entry else { continue };
            let target = Path::new(&entry.path)
                .file_name()
                .map(PathBuf::from)
                .unwrap_or_default();
            if std::fs::read_link(&link).ok().as_deref() == Some(target.as_path()) {
                continue;
            }
            let tmp = self.root.join("optouts").join(format!(".{name}.link"));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&target, &tmp).map_err(io_err(&tmp))?;
            std::fs::rename(&tmp, &link).map_err(io_err(&link))?;
        }
        Ok(())
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// Describes a finished file for the manifest.
    pub fn file_entry(&self, relative: String) -> Result<FileEntry, StoreError> {
        let path = self.root.join(&relative);
        let (sha256, bytes) = sha256_file(&path)?;
        let rows = parquet::row_count(&path).map_err(pq_err(&path))?;
        Ok(FileEntry {
            path: relative,
            rows,
            bytes,
            sha256,
        })
    }

    /// Makes `next` the store's state: writes it beside the current manifest,
    /// fsyncs, renames over it, then appends `next.commit_log` — with the
    /// generation's `commit` entry added — to the audit log and removes the
    /// files the new manifest no longer references (and only those: other
    /// batches may be staged beside them).
    pub fn commit(&mut self, mut next: Manifest) -> Result<(), StoreError> {
        next.generation = self.manifest.generation + 1;
        next.format = 1;
        let record = commit_entry(&self.manifest, &next);
        next.commit_log.push(record);
        for e in &mut next.commit_log {
            if let Some(o) = e.as_object_mut() {
                o.insert("generation".into(), Value::from(next.generation));
            }
        }
        let text = serde_json::to_string_pretty(&next).map_err(|e| StoreError::Corrupt {
            path: self.root.join("manifest.json"),
            message: e.to_string(),
        })? + "\n";
        let tmp = self.root.join("manifest.json.tmp");
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        crate::failpoint("before-manifest-swap");
        let target = self.root.join("manifest.json");
        std::fs::rename(&tmp, &target).map_err(io_err(&target))?;
        sync_dir(&self.root)?;
        crate::failpoint("after-manifest-swap");
        let before = self.referenced();
        self.manifest = next;
        self.audit().append(&self.manifest.commit_log)?;
        self.link_tombstones()?;
        for stale in before.difference(&self.referenced()) {
            std::fs::remove_file(stale).map_err(io_err(stale))?;
        }
        Ok(())
    }

    fn read_tombstones(&self) -> Result<Vec<Tombstone>, StoreError> {
        let Some(entry) = &self.manifest.tombstones else {
            return Ok(Vec::new());
        };
        read_tombstones(&self.root.join(&entry.path))
    }

    /// Writes a tombstones file for the next generation and returns its entry.
    pub fn write_tombstones(
        &self,
        tombstones: &[Tombstone],
        codec: Codec,
    ) -> Result<FileEntry, StoreError> {
        let relative = format!(
            "optouts/tombstones-{:06}.parquet",
            self.manifest.generation + 1
        );
        let path = self.root.join(&relative);
        let schema = Arc::new(Schema::new(vec![
            Field::new("patient_id", DataType::FixedSizeBinary(32), false),
            Field::new("patient_key", DataType::Int64, false),
            Field::new("source", DataType::Utf8, false),
            Field::new("recorded_at", DataType::Utf8, false),
        ]));
        let ids = FixedSizeBinaryArray::try_from_iter(tombstones.iter().map(|t| t.patient_id))
            .unwrap_or_else(|_| FixedSizeBinaryArray::new_null(32, 0));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(ids),
            Arc::new(Int64Array::from_iter_values(
                tombstones.iter().map(|t| patient_key(&t.patient_id)),
            )),
            Arc::new(StringArray::from_iter_values(
                tombstones.iter().map(|t| t.source.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                tombstones.iter().map(|t| t.recorded_at.as_str()),
            )),
        ];
        let batch =
            RecordBatch::try_new(schema.clone(), columns).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let mut w = parquet::Writer::create(&path, schema, codec).map_err(pq_err(&path))?;
        if batch.num_rows() > 0 {
            w.write(&batch).map_err(pq_err(&path))?;
        }
        w.finish().map_err(pq_err(&path))?;
        self.file_entry(relative)
    }
}

pub fn read_tombstones(path: &Path) -> Result<Vec<Tombstone>, StoreError> {
    use ::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let file = File::open(path).map_err(io_err(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(pq_err(path))?;
    let corrupt = |m: &str| StoreError::Corrupt {
        path: path.to_owned(),
        message: m.to_owned(),
    };
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| corrupt(&e.to_string()))?;
        let ids = batch
            .column_by_name("patient_id")
            .and_then(|c| c.as_any().downcast_ref::<FixedSizeBinaryArray>())
            .ok_or_else(|| corrupt("patient_id"))?;
        let sources = batch
            .column_by_name("source")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| corrupt("source"))?;
        let times = batch
            .column_by_name("recorded_at")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| corrupt("recorded_at"))?;
        for i in 0..batch.num_rows() {
            let mut id = [0u8; 32];
            id.copy_from_slice(ids.value(i));
            out.push(Tombstone {
                patient_id: id,
                source: sources.value(i).to_owned(),
                recorded_at: times.value(i).to_owned(),
            });
        }
    }
    Ok(out)
}
