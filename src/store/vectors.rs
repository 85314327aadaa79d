//! Deletion vectors: which rows of one data file are no longer reachable.
//!
//! Erasure has two phases (docs/design.md, "Erasure in two phases"). A
//! later opt-out first makes the patient **unreachable**: `gpdp optout
//! apply` commits, for each data file that holds their rows, a small
//! immutable file listing those rows' positions, and every reader skips
//! them. The bytes are **erased** later, by `gpdp optout purge`, which
//! rewrites the file without them and drops its vector. Rewriting a whole
//! file for every opt-out costs as much as the file; a vector costs 8
//! bytes a row.
//!
//! The format is gpdp's own and deliberately plain (gpdp is the only
//! reader; a patient's rows are one run in a file, so a sorted list is as
//! small as a compressed bitmap would be):
//!
//! ```text
//! offset  size  field
//! 0       8     magic "GPDPDV1\0"
//! 8       32    SHA-256 of the data file the vector masks (raw bytes)
//! 40      8     the data file's rows, u64 little-endian
//! 48      8     n, the number of positions, u64 little-endian
//! 56      8·n   positions: 0-based, absolute in the file, strictly increasing, below rows
//! ```
//!
//! A vector is named in the manifest beside its data file, with its own
//! SHA-256 ([`super::BatchEntry::vectors`]). [`load`] fails closed: the
//! bytes read must hash to what the manifest says, and the vector must be
//! bound to the data file in force (its checksum and row count) — a vector
//! for another file, or a file with no valid vector where the manifest
//! names one, is refused, never read unmasked.

use std::io::Write as _;
use std::path::Path;

use parquet::arrow::arrow_reader::{RowSelection, RowSelector};

use super::manifest::FileEntry;
use crate::digest::hex;

const MAGIC: &[u8; 8] = b"GPDPDV1\0";
const HEADER: usize = 56;

/// Why a deletion vector was refused.
#[derive(Debug, thiserror::Error)]
pub enum VectorError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: its SHA-256 is {found}, the manifest says {expected}")]
    Checksum {
        path: String,
        expected: String,
        found: String,
    },
    #[error("{path}: not a deletion vector ({why})")]
    Malformed { path: String, why: String },
    #[error("{path}: masks a different file than {data} ({why})")]
    WrongFile {
        path: String,
        data: String,
        why: String,
    },
}

/// The rows of one data file that no reader may return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletionVector {
    /// SHA-256 (hex) of the data file the vector belongs to.
    pub data_sha256: String,
    /// Rows in that data file.
    pub rows: u64,
    /// Positions masked: 0-based, strictly increasing, each below `rows`.
    positions: Vec<u64>,
}

impl DeletionVector {
    /// A vector for `data` masking `positions` (in any order, repeats
    /// allowed); `None` if a position is not a row of the file.
    pub fn new(data: &FileEntry, mut positions: Vec<u64>) -> Option<DeletionVector> {
        positions.sort_unstable();
        positions.dedup();
        if positions.last().is_some_and(|&p| p >= data.rows) {
            return None;
        }
        Some(DeletionVector {
            data_sha256: data.sha256.clone(),
            rows: data.rows,
            positions,
        })
    }

    /// The positions masked, in order.
    pub fn positions(&self) -> &[u64] {
        &self.positions
    }

    /// Rows masked.
    pub fn masked_rows(&self) -> u64 {
        self.positions.len() as u64
    }

    /// The share of the file's rows masked (0 for an empty file).
    pub fn deleted_share(&self) -> f64 {
        if self.rows == 0 {
            0.0
        } else {
            self.positions.len() as f64 / self.rows as f64
        }
    }

    /// This vector with `more` positions masked too (a later opt-out in the
    /// same file): vectors are never edited, a new one replaces the old.
    pub fn with(&self, more: impl IntoIterator<Item = u64>) -> Option<DeletionVector> {
        let mut positions = self.positions.clone();
        positions.extend(more);
        positions.sort_unstable();
        positions.dedup();
        if positions.last().is_some_and(|&p| p >= self.rows) {
            return None;
        }
        Some(DeletionVector {
            positions,
            ..self.clone()
        })
    }

    /// Whether row `position` is masked.
    pub fn contains(&self, position: u64) -> bool {
        self.positions.binary_search(&position).is_ok()
    }

    /// The rows a reader may return, as a Parquet row selection over the
    /// whole file (select, skip, select, …), for
    /// `ParquetRecordBatchReaderBuilder::with_row_selection` or DataFusion's
    /// per-file `ParquetRowSelection`.
    pub fn selection(&self) -> RowSelection {
        let mut selectors = Vec::with_capacity(2 * self.positions.len() + 1);
        let mut next = 0u64;
        for &p in &self.positions {
            selectors.push(RowSelector::select((p - next) as usize));
            selectors.push(RowSelector::skip(1));
            next = p + 1;
        }
        selectors.push(RowSelector::select((self.rows - next) as usize));
        // Zero-length selectors are dropped and neighbours of one kind merged.
        selectors.into_iter().collect()
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 8 * self.positions.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&unhex32(&self.data_sha256).unwrap_or([0; 32]));
        out.extend_from_slice(&self.rows.to_le_bytes());
        out.extend_from_slice(&(self.positions.len() as u64).to_le_bytes());
        for p in &self.positions {
            out.extend_from_slice(&p.to_le_bytes());
        }
        out
    }

    /// Reads a vector's bytes, checking its structure (not which file it
    /// belongs to: [`load`] does that).
    pub fn decode(path: &str, bytes: &[u8]) -> Result<DeletionVector, VectorError> {
        let malformed = |why: &str| VectorError::Malformed {
            path: path.to_owned(),
            why: why.to_owned(),
        };
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(malformed("no GPDPDV1 header"));
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let (rows, n) = (word(40), word(48));
        if (bytes.len() - HEADER) as u64 != n.saturating_mul(8) {
            return Err(malformed("its length does not match its count"));
        }
        let positions: Vec<u64> = (0..n as usize).map(|i| word(HEADER + 8 * i)).collect();
        if positions.windows(2).any(|w| w[0] >= w[1]) {
            return Err(malformed("positions are not strictly increasing"));
        }
        if positions.last().is_some_and(|&p| p >= rows) {
            return Err(malformed("a position is past the file's last row"));
        }
        Ok(DeletionVector {
            data_sha256: hex(&bytes[8..40]),
            rows,
            positions,
        })
    }
}

/// Writes a vector to `path` (a new name: vectors are immutable), fsynced,
/// and returns its manifest entry (`rows` = positions masked).
pub fn write(root: &Path, relative: &str, dv: &DeletionVector) -> Result<FileEntry, VectorError> {
    let path = root.join(relative);
    let bytes = dv.encode();
    let mut file = std::fs::File::create(&path).map_err(io_at(relative))?;
    file.write_all(&bytes).map_err(io_at(relative))?;
    file.sync_all().map_err(io_at(relative))?;
    Ok(FileEntry {
        path: relative.to_owned(),
        rows: dv.masked_rows(),
        bytes: bytes.len() as u64,
        sha256: crate::digest::sha256_hex(&bytes),
    })
}

/// Reads the vector `entry` names for the data file `data`, failing closed:
/// the bytes read must hash to the manifest's SHA-256, and the vector must
/// be bound to `data` (its SHA-256 and rows).
pub fn load(
    root: &Path,
    entry: &FileEntry,
    data: &FileEntry,
) -> Result<DeletionVector, VectorError> {
    let path = root.join(&entry.path);
    let bytes = std::fs::read(&path).map_err(io_at(&entry.path))?;
    let found = crate::digest::sha256_hex(&bytes);
    if found != entry.sha256 {
        return Err(VectorError::Checksum {
            path: entry.path.clone(),
            expected: entry.sha256.clone(),
            found,
        });
    }
    let dv = DeletionVector::decode(&entry.path, &bytes)?;
    let wrong = |why: &str| VectorError::WrongFile {
        path: entry.path.clone(),
        data: data.path.clone(),
        why: why.to_owned(),
    };
    if dv.data_sha256 != data.sha256 {
        return Err(wrong("its data checksum differs"));
    }
    if dv.rows != data.rows {
        return Err(wrong("its row count differs"));
    }
    Ok(dv)
}

fn io_at(path: &str) -> impl FnOnce(std::io::Error) -> VectorError + '_ {
    move |source| VectorError::Io {
        path: path.to_owned(),
        source,
    }
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(rows: u64) -> FileEntry {
        FileEntry {
            path: "tables/patients/b.parquet".into(),
            rows,
            bytes: 1,
            sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn round_trips_and_selects_every_row_but_the_masked() {
        let d = data(10);
        let dv = DeletionVector::new(&d, vec![7, 0, 3, 4, 3]).unwrap();
        assert_eq!(dv.positions(), &[0, 3, 4, 7]);
        let back = DeletionVector::decode("x", &dv.encode()).unwrap();
        assert_eq!(back, dv);
        let selected: Vec<u64> = {
            let mut at = 0u64;
            let mut out = Vec::new();
            for s in Vec::<RowSelector>::from(dv.selection()) {
                if !s.skip {
                    out.extend(at..at + s.row_count as u64);
                }
                at += s.row_count as u64;
            }
            assert_eq!(at, 10, "the selection covers the whole file");
            out
        };
        assert_eq!(selected, vec![1, 2, 5, 6, 8, 9]);
        assert!(dv.contains(4) && !dv.contains(5));
        assert_eq!(dv.with([9, 1]).unwrap().positions(), &[0, 1, 3, 4, 7, 9]);
        assert!(dv.with([10]).is_none(), "past the last row");
        assert!(DeletionVector::new(&d, vec![10]).is_none());
        // A vector of no positions is its header alone, and reads back.
        let empty = DeletionVector::new(&d, vec![]).unwrap();
        assert_eq!(empty.encode().len(), HEADER);
        assert_eq!(DeletionVector::decode("x", &empty.encode()).unwrap(), empty);
    }

    #[test]
    fn a_vector_for_another_file_or_with_other_bytes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(5);
        let dv = DeletionVector::new(&d, vec![1, 2]).unwrap();
        let entry = write(dir.path(), "v.dv", &dv).unwrap();
        assert_eq!(load(dir.path(), &entry, &d).unwrap(), dv);

        let other = FileEntry {
            sha256: "cd".repeat(32),
            ..d.clone()
        };
        assert!(matches!(
            load(dir.path(), &entry, &other),
            Err(VectorError::WrongFile { .. })
        ));
        let longer = FileEntry {
            rows: 6,
            ..d.clone()
        };
        assert!(matches!(
            load(dir.path(), &entry, &longer),
            Err(VectorError::WrongFile { .. })
        ));

        // One bit flipped: the checksum no longer matches.
        let mut bytes = std::fs::read(dir.path().join("v.dv")).unwrap();
        bytes[HEADER] ^= 1;
        std::fs::write(dir.path().join("v.dv"), &bytes).unwrap();
        assert!(matches!(
            load(dir.path(), &entry, &d),
            Err(VectorError::Checksum { .. })
        ));
    }

    /// What a purge's `--min-deleted-share` compares: masked rows over the
    /// file's rows, and 0 for a file of no rows (never NaN, which no
    /// threshold would pass).
    #[test]
    fn the_deleted_share_is_masked_rows_over_the_files_rows() {
        let dv = DeletionVector::new(&data(8), vec![1, 2]).unwrap();
        assert_eq!((dv.masked_rows(), dv.deleted_share()), (2, 0.25));
        let all = DeletionVector::new(&data(3), vec![0, 1, 2]).unwrap();
        assert_eq!(all.deleted_share(), 1.0);
        let none = DeletionVector::new(&data(0), vec![]).unwrap();
        assert_eq!((none.masked_rows(), none.deleted_share()), (0, 0.0));
    }

    #[test]
    fn malformed_bytes_are_refused() {
        let dv = DeletionVector::new(&data(5), vec![1, 2]).unwrap();
        let good = dv.encode();
        assert!(DeletionVector::decode("x", &good[..HEADER - 1]).is_err());
        assert!(DeletionVector::decode("x", &good[..good.len() - 1]).is_err());
        let mut unsorted = good.clone();
        unsorted[HEADER..HEADER + 8].copy_from_slice(&5u64.to_le_bytes());
        assert!(DeletionVector::decode("x", &unsorted).is_err());
        let mut magic = good;
        magic[0] = b'X';
        assert!(DeletionVector::decode("x", &magic).is_err());
    }
}
