//! Parquet files of the store: how they are written (codec, per-column
//! settings), read back, and rewritten without deleted patients.
//!
//! Every read of a GP data file outside the TRE goes through [`open`],
//! which applies the file's deletion vector ([`super::vectors`]) as a row
//! selection: a masked row is never returned, and a vector that does not
//! verify refuses the file. Rewrites ([`rewrite_without`]) drop masked rows
//! too, so a rewrite for one patient never brings another masked one back.
//!
//! Pseudonym columns are random bytes, but rows come grouped by patient, so
//! dictionary encoding shrinks them a great deal; min/max statistics would
//! publish two real pseudonyms per row group in the file footer, so
//! statistics are off for them.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use arrow::array::{
    Array, BooleanArray, FixedSizeBinaryArray, Int64Array, RecordBatch, RecordBatchReader,
};
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection};
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::schema::types::ColumnPath;

use super::error::{StoreError, io_err, pq_err};
use super::manifest::BatchEntry;
use super::vectors::{self, DeletionVector};
use crate::deid::pseudonym::{Pseudonym, from_slice, patient_key};
use crate::policy::Codec;

/// Columns that hold pseudonyms.
pub const PSEUDONYM_COLUMNS: [&str; 2] = ["patient_id", "practice_id"];

pub fn writer_properties(codec: Codec) -> WriterProperties {
    let compression = match codec {
        Codec::None => Compression::UNCOMPRESSED,
        Codec::Snappy => Compression::SNAPPY,
        Codec::Lz4 => Compression::LZ4_RAW,
        Codec::Zstd(level) => Compression::ZSTD(ZstdLevel::try_new(level).unwrap_or_default()),
    };
    let mut builder = WriterProperties::builder()
        .set_compression(compression)
        // Version 2 pages: with version 1 the writer silently ignores
        // dictionary encoding for FIXED_LEN_BYTE_ARRAY (arrow-rs #10524).
        .set_writer_version(WriterVersion::PARQUET_2_0)
        .set_max_row_group_row_count(Some(256 * 1024))
        .set_created_by(format!("gpdp {}", env!("CARGO_PKG_VERSION")));
    for column in PSEUDONYM_COLUMNS {
        let path = ColumnPath::from(column);
        builder = builder.set_column_statistics_enabled(path, EnabledStatistics::None);
    }
    builder.build()
}

/// Streams record batches into a Parquet file; `finish` fsyncs it and
/// returns the file's SHA-256 and size, computed as the bytes were written
/// (no second read).
pub struct Writer {
    inner: ArrowWriter<Hashing>,
}

/// A file that hashes what is written to it.
struct Hashing {
    file: File,
    digest: ring::digest::Context,
    bytes: u64,
}

impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.digest.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Writer {
    pub fn create(path: &Path, schema: SchemaRef, codec: Codec) -> parquet::errors::Result<Writer> {
        let file = Hashing {
            file: File::create(path)?,
            digest: ring::digest::Context::new(&ring::digest::SHA256),
            bytes: 0,
        };
        Ok(Writer {
            inner: ArrowWriter::try_new(file, schema, Some(writer_properties(codec)))?,
        })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> parquet::errors::Result<()> {
        self.inner.write(batch)
    }

    /// Closes and fsyncs the file; returns its SHA-256 (hex) and size in bytes.
    pub fn finish(self) -> parquet::errors::Result<(String, u64)> {
        let mut out = self.inner.into_inner()?;
        out.flush()?;
        out.file.sync_all()?;
        Ok((crate::digest::hex(out.digest.finish().as_ref()), out.bytes))
    }
}

/// A reader of `path` that returns only the rows `dv` does not mask (all
/// rows without one). The vector must describe this file: its row count
/// must be the footer's, or the file is refused.
pub fn reader(
    path: &Path,
    dv: Option<&DeletionVector>,
) -> parquet::errors::Result<ParquetRecordBatchReaderBuilder<File>> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?;
    let Some(dv) = dv else {
        return Ok(builder);
    };
    let rows = builder.metadata().file_metadata().num_rows() as u64;
    if rows != dv.rows {
        return Err(ParquetError::General(format!(
            "its deletion vector is for a file of {} rows, it has {rows}",
            dv.rows
        )));
    }
    Ok(builder.with_row_selection(dv.selection()))
}

/// The deletion vector of `batch`'s `table` file, loaded and verified
/// ([`vectors::load`]: checksum, binding to the data file in force), or
/// `None` if the file has none.
pub fn vector(
    root: &Path,
    batch: &BatchEntry,
    table: &str,
) -> Result<Option<DeletionVector>, StoreError> {
    let (Some(entry), Some(data)) = (batch.vectors.get(table), batch.files.get(table)) else {
        return Ok(None);
    };
    Ok(Some(vectors::load(root, entry, data)?))
}

/// The shared reader of a GP data file: `batch`'s `table` file with its
/// deletion vector applied, failing closed (a vector that does not verify
/// is an error naming it, never an unmasked read).
pub fn open(
    root: &Path,
    batch: &BatchEntry,
    table: &str,
) -> Result<ParquetRecordBatchReaderBuilder<File>, StoreError> {
    let Some(file) = batch.files.get(table) else {
        let path = root.join("tables").join(table);
        return Err(io_err(&path)(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("batch {} has no {table} file", batch.batch),
        )));
    };
    let dv = vector(root, batch, table)?;
    let path = root.join(&file.path);
    reader(&path, dv.as_ref()).map_err(pq_err(&path))
}

/// Every `patient_id` in a file that `dv` does not mask (every one without
/// a vector).
pub fn patient_ids(
    path: &Path,
    dv: Option<&DeletionVector>,
) -> parquet::errors::Result<Vec<Pseudonym>> {
    let builder = reader(path, dv)?;
    let mask = only(&builder, "patient_id")?;
    let mut out = Vec::new();
    for batch in builder.with_projection(mask).build()? {
        let batch = batch?;
        let ids = pseudonyms(&batch)?;
        out.extend((0..ids.len()).map(|i| from_slice(ids.value(i))));
    }
    Ok(out)
}

/// The `patient_key` of each row of a store file that `dv` does not mask
/// (the first 8 bytes of the row's pseudonym, stored beside it): a quarter
/// of the bytes [`patient_ids`] decodes, for what only asks which patients
/// a file holds.
pub fn patient_keys(path: &Path, dv: Option<&DeletionVector>) -> parquet::errors::Result<Vec<i64>> {
    let builder = reader(path, dv)?;
    let mask = only(&builder, "patient_key")?;
    let mut out = Vec::new();
    for batch in builder.with_projection(mask).build()? {
        out.extend_from_slice(keys(&batch?)?.values());
    }
    Ok(out)
}

/// The positions (0-based, absolute in the file, in order) of the rows of
/// `patients` in a file, masked or not: what a deletion vector for them lists.
///
/// Found in two passes: the rows whose stored `patient_key` is one of
/// theirs (8 bytes a row to decode, not the pseudonym's 32), then, reading
/// only those rows, their pseudonyms — two patients share a key only by a
/// 64-bit prefix collision, and that must never mask another patient's rows.
pub fn positions_of(
    path: &Path,
    patients: &HashSet<Pseudonym>,
) -> parquet::errors::Result<Vec<u64>> {
    let wanted: HashSet<i64, ahash::RandomState> = patients.iter().map(patient_key).collect();
    // A bit per value of a key's low 16 bits: most rows are passed over
    // by one bit test, before any hashing.
    let mut maybe = vec![0u64; 1 << 10];
    for k in &wanted {
        let low = (*k as u64 & 0xFFFF) as usize;
        maybe[low >> 6] |= 1 << (low & 63);
    }
    let builder = reader(path, None)?;
    let rows = builder.metadata().file_metadata().num_rows() as usize;
    let (by_key, ids) = (
        only(&builder, "patient_key")?,
        only(&builder, "patient_id")?,
    );
    let (mut candidates, mut at) = (Vec::new(), 0usize);
    for batch in builder.with_projection(by_key).build()? {
        let batch = batch?;
        let keys = keys(&batch)?;
        for (i, k) in keys.values().iter().enumerate() {
            let low = (*k as u64 & 0xFFFF) as usize;
            if maybe[low >> 6] & (1 << (low & 63)) != 0 && wanted.contains(k) {
                candidates.push(at + i);
            }
        }
        at += keys.len();
    }
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let selection =
        RowSelection::from_consecutive_ranges(candidates.iter().map(|&i| i..i + 1), rows);
    let confirm = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?
        .with_projection(ids)
        .with_row_selection(selection)
        .build()?;
    let mut candidates = candidates.into_iter();
    let mut out = Vec::new();
    for batch in confirm {
        let batch = batch?;
        let ids = pseudonyms(&batch)?;
        for i in 0..ids.len() {
            let at = candidates.next().ok_or_else(|| {
                ParquetError::General("more rows read back than were selected".into())
            })?;
            if patients.contains(ids.value(i)) {
                out.push(at as u64);
            }
        }
    }
    if candidates.next().is_some() {
        return Err(ParquetError::General(
            "fewer rows read back than were selected".into(),
        ));
    }
    Ok(out)
}

/// The patients whose rows `dv` masks in a file (their `patient_id`s at
/// the vector's positions).
pub fn masked_patients(
    path: &Path,
    dv: &DeletionVector,
) -> parquet::errors::Result<HashSet<Pseudonym>> {
    let builder = reader(path, None)?;
    let rows = builder.metadata().file_metadata().num_rows() as u64;
    if rows != dv.rows {
        return Err(ParquetError::General(format!(
            "its deletion vector is for a file of {} rows, it has {rows}",
            dv.rows
        )));
    }
    let mask = only(&builder, "patient_id")?;
    let (mut out, mut at) = (HashSet::new(), 0u64);
    let positions = dv.positions();
    let mut next = 0usize;
    for batch in builder.with_projection(mask).build()? {
        let batch = batch?;
        let ids = pseudonyms(&batch)?;
        let end = at + ids.len() as u64;
        while next < positions.len() && positions[next] < end {
            out.insert(from_slice(ids.value((positions[next] - at) as usize)));
            next += 1;
        }
        at = end;
    }
    Ok(out)
}

/// A projection of `builder`'s file to its one column `name`.
fn only(
    builder: &ParquetRecordBatchReaderBuilder<File>,
    name: &str,
) -> parquet::errors::Result<ProjectionMask> {
    let index = builder
        .schema()
        .index_of(name)
        .map_err(|e| ParquetError::General(e.to_string()))?;
    Ok(ProjectionMask::roots(builder.parquet_schema(), [index]))
}

fn keys(batch: &RecordBatch) -> parquet::errors::Result<&Int64Array> {
    batch
        .column_by_name("patient_key")
        .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
        .ok_or_else(|| ParquetError::General("patient_key is not Int64".into()))
}

fn pseudonyms(batch: &RecordBatch) -> parquet::errors::Result<&FixedSizeBinaryArray> {
    batch
        .column_by_name("patient_id")
        .and_then(|c| c.as_any().downcast_ref::<FixedSizeBinaryArray>())
        .ok_or_else(|| {
            parquet::errors::ParquetError::General("patient_id is not FixedSizeBinary(32)".into())
        })
}

fn prefix(id: &[u8]) -> u64 {
    u64::from_le_bytes(id[..8].try_into().expect("a pseudonym has 32 bytes"))
}

/// Rows before and after a rewrite, and the new file's SHA-256 and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// Rows stored in the old file (masked ones included).
    pub rows_before: u64,
    /// Of those, rows its deletion vector masked: dropped whoever they are.
    pub rows_masked: u64,
    pub rows_after: u64,
    pub sha256: String,
    pub bytes: u64,
}

impl Rewrite {
    /// Rows of the patients asked for that the rewrite removed (not
    /// counting the masked rows it dropped).
    pub fn rows_removed(&self) -> u64 {
        self.rows_before - self.rows_masked - self.rows_after
    }
}

/// Copies `src` to `dst` without the rows of `remove` and without the rows
/// `dv` masks (a rewrite never brings a masked row back; the new file needs
/// no vector), streaming batch by batch.
pub fn rewrite_without(
    src: &Path,
    dst: &Path,
    remove: &HashSet<Pseudonym>,
    dv: Option<&DeletionVector>,
    codec: Codec,
) -> parquet::errors::Result<Rewrite> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(src)?)?;
    if let Some(dv) = dv {
        let rows = builder.metadata().file_metadata().num_rows() as u64;
        if rows != dv.rows {
            return Err(ParquetError::General(format!(
                "{}: its deletion vector is for a file of {} rows, it has {rows}",
                src.display(),
                dv.rows
            )));
        }
    }
    let reader = builder.build()?;
    let schema: SchemaRef = reader.schema();
    let mut writer = Writer::create(dst, schema, codec)?;
    let (mut before, mut after) = (0u64, 0u64);
    // Rows are checked on the pseudonym's first 8 bytes with a fast hash,
    // and only a match is compared in full: most rows cost one lookup.
    let prefixes: HashSet<u64, ahash::RandomState> = remove.iter().map(|p| prefix(p)).collect();
    let masked = dv.map_or(&[][..], |dv| dv.positions());
    let mut next = 0usize;
    for batch in reader {
        let batch = batch?;
        let ids = pseudonyms(&batch)?;
        let hit = |i: usize| {
            let id = ids.value(i);
            prefixes.contains(&prefix(id)) && remove.contains(id)
        };
        // The masked rows of this batch, as offsets in it.
        let end = before + ids.len() as u64;
        let first = next;
        while next < masked.len() && masked[next] < end {
            next += 1;
        }
        let masked_here: HashSet<usize> = masked[first..next]
            .iter()
            .map(|p| (p - before) as usize)
            .collect();
        let kept = if !masked_here.is_empty() || (0..ids.len()).any(hit) {
            let keep: BooleanArray = (0..ids.len())
                .map(|i| Some(!masked_here.contains(&i) && !hit(i)))
                .collect();
            arrow::compute::filter_record_batch(&batch, &keep)?
        } else {
            batch.clone()
        };
        before = end;
        after += kept.num_rows() as u64;
        if kept.num_rows() > 0 {
            writer.write(&kept)?;
        }
    }
    let (sha256, bytes) = writer.finish()?;
    Ok(Rewrite {
        rows_before: before,
        rows_masked: masked.len() as u64,
        rows_after: after,
        sha256,
        bytes,
    })
}

/// Number of rows in a file (from its footer).
pub fn row_count(path: &Path) -> parquet::errors::Result<u64> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?;
    Ok(builder.metadata().file_metadata().num_rows() as u64)
}
