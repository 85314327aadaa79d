//! The baseline peer: plain CSV → Parquet, every column as text, with the
//! same crates (csv, arrow, parquet), the same codec and the same number of
//! threads as collection, and nothing else: no validation, no Type 1 pass, no
//! pseudonyms, no lookups. Collection can only be slower; the ratio says by
//! how much de-identification costs.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use arrow::array::{ArrayRef, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema};

use crate::extract::{PracticeExtract, Table};
use crate::policy::Codec;
use crate::store::parquet::Writer;

#[derive(Debug, Clone, Copy, Default)]
pub struct BaselineReport {
    pub rows: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// Converts every table of every practice of `extract` into `out`.
pub fn csv_to_parquet(
    extract: &Path,
    out: &Path,
    threads: usize,
    codec: Codec,
) -> anyhow::Result<BaselineReport> {
    let practices = crate::extract::practices(extract, &[])?;
    std::fs::create_dir_all(out)?;
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let results: Vec<anyhow::Result<(u64, u64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.clamp(1, practices.len()))
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<(u64, u64)> {
                    let (mut rows, mut bytes) = (0, 0);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(p) = practices.get(i) else { break };
                        for table in Table::ALL {
                            let (r, b) = convert(p, table, out, codec)?;
                            rows += r;
                            bytes += b;
                        }
                    }
                    Ok((rows, bytes))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a baseline worker panicked")))
            })
            .collect()
    });
    let mut report = BaselineReport::default();
    for r in results {
        let (rows, bytes) = r?;
        report.rows += rows;
        report.bytes += bytes;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn convert(
    p: &PracticeExtract,
    table: Table,
    out: &Path,
    codec: Codec,
) -> anyhow::Result<(u64, u64)> {
    let path = p.path(table);
    let bytes = std::fs::metadata(&path)?.len();
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .buffer_capacity(256 * 1024)
        .from_path(&path)?;
    let names: Vec<String> = reader
        .byte_headers()?
        .iter()
        .map(|h| String::from_utf8_lossy(h).into_owned())
        .collect();
    let schema = Arc::new(Schema::new(
        names
            .iter()
            .map(|n| Field::new(n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let mut writer = Writer::create(
        &out.join(format!("{}-{}.parquet", p.code, table.name())),
        schema.clone(),
        codec,
    )?;
    let batch_rows = crate::deid::builders::BATCH_ROWS;
    let mut builders: Vec<StringBuilder> = names
        .iter()
        .map(|_| StringBuilder::with_capacity(batch_rows, batch_rows * 12))
        .collect();
    let mut record = csv::ByteRecord::new();
    let (mut rows, mut pending) = (0u64, 0usize);
    let flush = |builders: &mut Vec<StringBuilder>, writer: &mut Writer| -> anyhow::Result<()> {
        let arrays: Vec<ArrayRef> = builders
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        writer.write(&RecordBatch::try_new(schema.clone(), arrays)?)?;
        Ok(())
    };
    while reader.read_byte_record(&mut record)? {
        for (i, b) in builders.iter_mut().enumerate() {
            b.append_value(String::from_utf8_lossy(record.get(i).unwrap_or_default()));
        }
        rows += 1;
        pending += 1;
        if pending == batch_rows {
            flush(&mut builders, &mut writer)?;
            pending = 0;
        }
    }
    if pending > 0 {
        flush(&mut builders, &mut writer)?;
    }
    writer.finish()?;
    Ok((rows, bytes))
}
