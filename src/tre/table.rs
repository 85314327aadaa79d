//! The GP data files as one DataFusion table, with each file's deletion
//! vector applied at scan time.
//!
//! Erasure has two phases (docs/design.md, "Erasure in two phases"): `gpdp
//! optout apply` first makes a patient unreachable with a deletion vector
//! per data file ([`crate::store::vectors`]); the bytes go at the purge.
//! DataFusion's `ListingTable` cannot carry a per-file mask, so the TRE
//! registers its three GP tables (patients, clinical events, medications)
//! as a [`StoreTable`]: the same Parquet source, files and schema as a
//! `ListingTable` over the same files, with each masked file's vector
//! attached to it as a `ParquetRowSelection` (`PartitionedFile` extension).
//! DataFusion's Parquet opener turns that whole-file selection into a
//! per-row-group access plan from the footer it reads anyway, and refuses a
//! selection that does not cover exactly the file's rows (a vector for
//! another file fails the query, never reads it unmasked); later pruning
//! only narrows it. The views' tombstone anti-join stays, as a second line.
//!
//! What it relies on:
//! - the vectors it is given were loaded and verified by the caller
//!   ([`crate::store::vectors::load`]: checksum, bound to the data file in
//!   force);
//! - **no exact statistics**: the scan states its row count as the
//!   manifest's rows less the masked ones, and the footers' column
//!   statistics, all *inexact*, so DataFusion never answers `count(*)`,
//!   `min` or `max` from Parquet footers (which count and bound the masked
//!   rows too), while the planner estimates sizes as it did over a
//!   `ListingTable` (join sides, filter selectivity). No file or file group
//!   carries statistics of its own (they would be exact);
//! - `pushdown_filters` stays off (DataFusion's default; `ParquetFormat::default()`
//!   here): runtime row-group pruning combined with a row selection had a
//!   family of bugs (DataFusion #24352) that could apply a skip to the
//!   wrong row;
//! - files are split into `target_partitions` groups exactly as
//!   `ListingTable` splits them, and the schema is inferred as it infers it
//!   (from the first file, `ParquetFormat::default()`), so plans and answer
//!   types are the same as over a `ListingTable`;
//! - the footer cache is the runtime's (`ParquetFormat::create_physical_plan`
//!   reads through it), shared across requests (see [`super::session`]).

use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::stats::Precision;
use datafusion::common::{Result, Statistics, project_schema};
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingTableUrl, PartitionedFile};
use datafusion::datasource::object_store::ObjectStoreUrl;
use datafusion::datasource::physical_plan::parquet::ParquetRowSelection;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::object_store::{ObjectMeta, ObjectStoreExt as _};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use parquet::arrow::arrow_reader::RowSelection;

use crate::store::FileEntry;
use crate::store::vectors::DeletionVector;

/// One data file of a [`StoreTable`]: where it is, and the rows a scan may
/// return (`None`: every row).
#[derive(Debug, Clone)]
struct StoreFile {
    meta: ObjectMeta,
    keep: Option<RowSelection>,
}

/// GP data files as one table, deletion vectors applied at scan.
#[derive(Debug)]
pub struct StoreTable {
    schema: SchemaRef,
    files: Vec<StoreFile>,
    /// What the planner is told: all inexact (see the module docs).
    statistics: Statistics,
}

impl StoreTable {
    /// The table over `files` (relative to `store`), each with its verified
    /// deletion vector if it has one.
    pub async fn open(
        state: &dyn Session,
        store: &Path,
        files: Vec<(FileEntry, Option<DeletionVector>)>,
    ) -> Result<StoreTable> {
        let objects = state
            .runtime_env()
            .object_store(ObjectStoreUrl::local_filesystem())?;
        let mut out = Vec::with_capacity(files.len());
        let mut rows_live = 0u64;
        for (entry, dv) in files {
            let url = ListingTableUrl::parse(store.join(&entry.path).to_string_lossy())?;
            // The real size and modification time: the footer cache checks both.
            let meta = objects.head(url.prefix()).await?;
            rows_live += entry.rows - dv.as_ref().map_or(0, DeletionVector::masked_rows);
            out.push(StoreFile {
                meta,
                keep: dv.map(|dv| dv.selection()),
            });
        }
        // As ListingTable infers it: from the first file, with the same format.
        let schema = match out.first() {
            Some(first) => {
                ParquetFormat::default()
                    .infer_schema(state, &objects, std::slice::from_ref(&first.meta))
                    .await?
            }
            None => Arc::new(Schema::empty()),
        };
        // The footers' statistics, as ListingTable collects them (through
        // the same cache), merged and made inexact; the row count is the
        // manifest's less the masked rows.
        let format = ParquetFormat::default();
        let mut per_file = Vec::with_capacity(out.len());
        for f in &out {
            per_file.push(
                format
                    .infer_stats(state, &objects, schema.clone(), &f.meta)
                    .await?,
            );
        }
        let statistics = Statistics::try_merge_iter(per_file.iter(), &schema)?
            .to_inexact()
            .with_num_rows(Precision::Inexact(rows_live as usize));
        Ok(StoreTable {
            schema,
            files: out,
            statistics,
        })
    }
}

#[async_trait::async_trait]
impl TableProvider for StoreTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// As a `ListingTable` without partition columns: every filter is
    /// inexact (kept above the scan; the physical optimizer still hands it
    /// to the Parquet source for row-group and page pruning).
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if self.files.is_empty() {
            return Ok(Arc::new(EmptyExec::new(project_schema(
                &self.schema,
                projection,
            )?)));
        }
        let files = self
            .files
            .iter()
            .map(|f| {
                // Never with_statistics: a file's statistics would be exact.
                let file = PartitionedFile::from(f.meta.clone());
                match &f.keep {
                    Some(keep) => file.with_extension(ParquetRowSelection::new(keep.clone())),
                    None => file,
                }
            })
            .collect();
        let groups = FileGroup::new(files).split_files(state.config().target_partitions());
        let format = ParquetFormat::default();
        let source = format.file_source(self.schema.clone().into());
        let config = FileScanConfigBuilder::new(ObjectStoreUrl::local_filesystem(), source)
            .with_file_groups(groups)
            .with_statistics(self.statistics.clone())
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        format.create_physical_plan(state, config).await
    }
}
