//! Never answer from bytes the manifest did not record.
//!
//! The manifest records every data file's SHA-256 when it is committed. A
//! file that changed since — a flipped byte, a truncated copy, a file put
//! back from another store — must not be read as if it were the one
//! recorded: the TRE would answer from data nobody collected, and the
//! opt-outs enforced at collection would no longer be what is read. So
//! every reader checks each file it will read against the manifest first.
//!
//! Hashing a large store on every request would cost more than the query,
//! so a file once verified is remembered by its path, size and
//! modification time: in this process, and in `STORE/audit/verified.json`
//! so that the next `gpdp query` process pays nothing either. Anything that
//! rewrites a file changes its size or modification time and is hashed
//! again. The cache guards against accident (a bad disk, a bad copy, a cut
//! transfer); an attacker who can write the store can write the cache too,
//! which is why `gpdp audit`'s `files_match_manifest` always hashes every
//! file afresh.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use super::FileEntry;

/// A file that is not what the manifest recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// Relative to the store root.
    pub path: String,
    /// What is wrong: `checksum differs`, `missing`, `unreadable: …`.
    pub problem: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.path, self.problem)
    }
}

/// What identifies one version of a file on disk, cheaply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    size: u64,
    modified_ns: u128,
    sha256: String,
}

type Cache = BTreeMap<PathBuf, Seen>;

fn memory() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(Cache::new()))
}

const CACHE_FILE: &str = "audit/verified.json";

fn stamp(path: &Path) -> std::io::Result<(u64, u128)> {
    let meta = std::fs::metadata(path)?;
    let modified = meta
        .modified()?
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    Ok((meta.len(), modified))
}

/// Checks `files` (entries of the manifest of `store`) against their
/// recorded SHA-256, hashing only those not already verified at their
/// current size and modification time. Returns every mismatch.
pub fn files(store: &Path, files: &[&FileEntry]) -> Vec<Mismatch> {
    let disk_path = store.join(CACHE_FILE);
    let mut cache = memory().lock().unwrap_or_else(|e| e.into_inner());
    let (mut bad, mut learned, mut read_saved) = (Vec::new(), false, false);
    for f in files {
        let path = store.join(&f.path);
        // One stat a file: what it is on disk now, against what was verified.
        let now = stamp(&path);
        let known = |cache: &Cache| {
            now.as_ref().is_ok_and(|&(size, modified_ns)| {
                cache.get(&path).is_some_and(|seen| {
                    seen.sha256 == f.sha256 && (seen.size, seen.modified_ns) == (size, modified_ns)
                })
            })
        };
        if known(&cache) {
            continue;
        }
        if !read_saved {
            // Whatever another process verified is as good as our own.
            read_saved = true;
            if let Some(saved) = std::fs::read(&disk_path)
                .ok()
                .and_then(|b| serde_json::from_slice::<BTreeMap<String, Seen>>(&b).ok())
            {
                for (rel, seen) in saved {
                    cache.entry(store.join(rel)).or_insert(seen);
                }
            }
            if known(&cache) {
                continue;
            }
        }
        let outcome = now.and_then(|(size, modified_ns)| {
            let (sha256, _) = super::sha256_file(&path).map_err(std::io::Error::other)?;
            Ok(Seen {
                size,
                modified_ns,
                sha256,
            })
        });
        match outcome {
            Ok(seen) if seen.sha256 == f.sha256 => {
                cache.insert(path, seen);
                learned = true;
            }
            Ok(_) => bad.push(Mismatch {
                path: f.path.clone(),
                problem: "checksum differs".into(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bad.push(Mismatch {
                path: f.path.clone(),
                problem: "missing".into(),
            }),
            Err(e) => bad.push(Mismatch {
                path: f.path.clone(),
                problem: format!("unreadable: {e}"),
            }),
        }
    }
    if learned {
        save(store, &cache, &disk_path);
    }
    bad
}

/// Forgets what this process verified, so that the next check reads the
/// saved cache as a new process would (for measuring that cost).
pub fn forget_in_memory() {
    memory().lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// Writes this store's part of the cache beside the audit log (atomically;
/// a cache that cannot be written only costs the next process a hash).
fn save(store: &Path, cache: &Cache, disk_path: &Path) {
    let mine: BTreeMap<String, &Seen> = cache
        .iter()
        .filter_map(|(p, s)| {
            let rel = p.strip_prefix(store).ok()?;
            Some((rel.to_string_lossy().into_owned(), s))
        })
        .collect();
    let Ok(body) = serde_json::to_vec(&mine) else {
        return;
    };
    let tmp = disk_path.with_extension(format!("json.{}.tmp", std::process::id()));
    if std::fs::write(&tmp, body).is_ok() && std::fs::rename(&tmp, disk_path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(store: &Path, rel: &str, bytes: &[u8]) -> FileEntry {
        std::fs::create_dir_all(store.join(rel).parent().unwrap()).unwrap();
        std::fs::write(store.join(rel), bytes).unwrap();
        let (sha256, size) = super::super::sha256_file(&store.join(rel)).unwrap();
        FileEntry {
            path: rel.into(),
            rows: 0,
            bytes: size,
            sha256,
        }
    }

    #[test]
    fn a_changed_missing_or_rewritten_file_is_named_and_a_verified_one_is_not_hashed_again() {
        let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path();
        std::fs::create_dir_all(store.join("audit")).unwrap();
        let a = entry(store, "tables/a.parquet", b"aaaa");
        let b = entry(store, "tables/b.parquet", b"bbbb");
        assert_eq!(files(store, &[&a, &b]), vec![]);
        // The cache on disk names both, with the checksums recorded.
        let saved = std::fs::read_to_string(store.join(CACHE_FILE)).unwrap();
        assert!(saved.contains("tables/a.parquet") && saved.contains(&a.sha256));
        // A flipped byte (same size; a new modification time) is caught.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(store.join("tables/a.parquet"), b"aaab").unwrap();
        let bad = files(store, &[&a, &b]);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].path, "tables/a.parquet");
        assert_eq!(bad[0].problem, "checksum differs");
        std::fs::remove_file(store.join("tables/b.parquet")).unwrap();
        let bad = files(store, &[&b]);
        assert_eq!(bad[0].problem, "missing");
        // A file verified before is not read again: unreadable bytes at the
        // same size and time would pass, which is why audit always hashes.
        let c = entry(store, "tables/c.parquet", b"cccc");
        assert_eq!(files(store, &[&c]), vec![]);
        let cached = memory()
            .lock()
            .unwrap()
            .get(&store.join("tables/c.parquet"))
            .cloned();
        assert_eq!(cached.map(|s| s.sha256), Some(c.sha256.clone()));
    }

    static SERIAL: Mutex<()> = Mutex::new(());

    /// Rewrites `rel` with other bytes of the same size and puts its
    /// modification time back: a change only hashing can see.
    fn same_stamp_other_bytes(store: &Path, rel: &str, bytes: &[u8]) {
        let path = store.join(rel);
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, bytes).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(modified)
            .unwrap();
    }

    #[test]
    fn a_new_process_trusts_the_saved_cache_and_nothing_else() {
        // It empties the process's cache, which the other test reads.
        let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path();
        std::fs::create_dir_all(store.join("audit")).unwrap();
        let a = entry(store, "tables/a.parquet", b"aaaa");
        assert_eq!(files(store, &[&a]), vec![]);
        // A manifest that records another checksum for the same file is
        // never satisfied by what was verified against the old one.
        let other = FileEntry {
            sha256: "0".repeat(64),
            ..a.clone()
        };
        assert_eq!(files(store, &[&other])[0].problem, "checksum differs");
        // As a new process: the saved cache stands for the file at its
        // size and time (documented: audit always hashes afresh).
        forget_in_memory();
        same_stamp_other_bytes(store, "tables/a.parquet", b"aaab");
        assert_eq!(files(store, &[&a]), vec![], "the saved cache was read");
        // Forgotten in memory and no saved cache: hashed afresh.
        forget_in_memory();
        std::fs::remove_file(store.join(CACHE_FILE)).unwrap();
        assert_eq!(files(store, &[&a])[0].problem, "checksum differs");
    }
}
