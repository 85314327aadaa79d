//! Parquet files of the store: how they are written (codec, per-column
//! settings), read back, and rewritten without deleted patients.
//!
//! Pseudonym columns are random bytes, but rows come grouped by patient, so
//! dictionary encoding shrinks them a great deal; min/max statistics would
//! publish two real pseudonyms per row group in the file footer, so
//! statistics are off for them.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use arrow::array::{Array, BooleanArray, FixedSizeBinaryArray, RecordBatch, RecordBatchReader};
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::schema::types::ColumnPath;

use crate::deid::pseudonym::{Pseudonym, from_slice};
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

/// Every `patient_id` in a file.
pub fn patient_ids(path: &Path) -> parquet::errors::Result<Vec<Pseudonym>> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?;
    let index = builder
        .schema()
        .index_of("patient_id")
        .map_err(|e| parquet::errors::ParquetError::General(e.to_string()))?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
    let mut out = Vec::new();
    for batch in builder.with_projection(mask).build()? {
        let batch = batch?;
        let ids = pseudonyms(&batch)?;
        out.extend((0..ids.len()).map(|i| from_slice(ids.value(i))));
    }
    Ok(out)
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
    pub rows_before: u64,
    pub rows_after: u64,
    pub sha256: String,
    pub bytes: u64,
}

/// Copies `src` to `dst` without the rows of `remove`, streaming batch by batch.
pub fn rewrite_without(
    src: &Path,
    dst: &Path,
    remove: &HashSet<Pseudonym>,
    codec: Codec,
) -> parquet::errors::Result<Rewrite> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(src)?)?.build()?;
    let schema: SchemaRef = reader.schema();
    let mut writer = Writer::create(dst, schema, codec)?;
    let (mut before, mut after) = (0u64, 0u64);
    // Rows are checked on the pseudonym's first 8 bytes with a fast hash,
    // and only a match is compared in full: most rows cost one lookup.
    let prefixes: HashSet<u64, ahash::RandomState> = remove.iter().map(|p| prefix(p)).collect();
    for batch in reader {
        let batch = batch?;
        let ids = pseudonyms(&batch)?;
        let hit = |i: usize| {
            let id = ids.value(i);
            prefixes.contains(&prefix(id)) && remove.contains(id)
        };
        let kept = if (0..ids.len()).any(hit) {
            let keep: BooleanArray = (0..ids.len()).map(|i| Some(!hit(i))).collect();
            arrow::compute::filter_record_batch(&batch, &keep)?
        } else {
            batch.clone()
        };
        before += batch.num_rows() as u64;
        after += kept.num_rows() as u64;
        if kept.num_rows() > 0 {
            writer.write(&kept)?;
        }
    }
    let (sha256, bytes) = writer.finish()?;
    Ok(Rewrite {
        rows_before: before,
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
