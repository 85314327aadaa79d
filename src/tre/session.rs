//! Safe settings: one DataFusion session per request, holding only the
//! project's views over the store.
//!
//! The views are built in a separate, internal context that knows the raw
//! Parquet tables; only the view plans (which hold their table providers
//! inside them) are registered in the researcher's session. So the
//! researcher's catalog has exactly the approved views and nothing else: no
//! raw tables, no opt-out lists, no table functions, no information_schema.
//! For projects the National Data Opt-out applies to, the NDOO filter is part
//! of every view, so no query can get around it; tombstoned patients are
//! filtered in every view as a second line of defence.
//!
//! The three GP tables are [`super::table::StoreTable`]s: each data file's
//! deletion vector is loaded here ([`crate::store::vectors::load`]) and
//! applied at scan, so a patient a later opt-out masked is unreachable even
//! without the tombstone anti-join. A vector that does not load refuses the
//! request (`store_corrupt`), as a data file that does not match the
//! manifest does. Tombstones, the NDOO list and linked files carry no
//! vectors and stay `ListingTable`s.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::{TableProvider, ViewTable};
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::cache::cache_manager::{CacheManager, CacheManagerConfig};
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SessionConfig, SessionContext};

use super::error::{Refusal, TreError};
use crate::policy::tre::{Project, TrePolicy};
use crate::store::vectors::DeletionVector;
use crate::store::{FileEntry, Manifest};

/// A researcher's session and the plans of its views (the guard trusts
/// exactly these subtrees).
pub struct Session {
    pub ctx: SessionContext,
    pub views: HashMap<String, LogicalPlan>,
}

/// Parquet footers, shared by every session of this process. Store files are
/// immutable (a rewrite gets a new name) and the cache checks each file's
/// size and modification time, so a footer read for one request serves the
/// next: a long-running TRE (`gpdp serve`) reads each footer once.
fn shared_caches() -> Result<CacheManagerConfig, TreError> {
    static CACHES: OnceLock<Arc<CacheManager>> = OnceLock::new();
    let caches = match CACHES.get() {
        Some(c) => c.clone(),
        None => {
            let built = CacheManager::try_new(&CacheManagerConfig::default())
                .map_err(TreError::internal)?;
            CACHES.get_or_init(|| built).clone()
        }
    };
    Ok(CacheManagerConfig::default()
        .with_file_metadata_cache(Some(caches.get_file_metadata_cache())))
}

/// The partitions a query's scan is split into by default (one per core
/// of the machine gpdp was measured on).
pub const PARTITIONS: usize = 2;

fn new_context(policy: &TrePolicy, partitions: usize) -> Result<SessionContext, TreError> {
    let config = SessionConfig::new()
        .with_target_partitions(partitions.max(1))
        .with_information_schema(false);
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(FairSpillPool::new(policy.memory_mb << 20)))
        .with_cache_manager(shared_caches()?)
        .build_arc()
        .map_err(TreError::internal)?;
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        // No table functions: generate_series, range and friends are not tables of patients.
        .with_table_functions(HashMap::new())
        .build();
    Ok(SessionContext::new_with_state(state))
}

async fn listing(
    ctx: &SessionContext,
    store: &Path,
    files: &[String],
) -> Result<Arc<ListingTable>, TreError> {
    let urls = files
        .iter()
        .map(|f| ListingTableUrl::parse(store.join(f).to_string_lossy()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(TreError::internal)?;
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(ListingOptions::new(Arc::new(ParquetFormat::default())))
        .infer_schema(&ctx.state())
        .await
        .map_err(TreError::internal)?;
    Ok(Arc::new(
        ListingTable::try_new(config).map_err(TreError::internal)?,
    ))
}

/// The column to match an opt-out list on: `patient_key` (the pseudonym's
/// first 64 bits: an integer anti-join, several times cheaper than one on
/// 32-byte pseudonyms) when the list carries it. Two patients sharing a key
/// would only remove an extra patient, never keep an opted-out one. Lists
/// written before the key column existed are matched on `patient_id`.
fn match_column(table: &ListingTable) -> &'static str {
    if table.schema().column_with_name("patient_key").is_some() {
        "patient_key"
    } else {
        "patient_id"
    }
}

/// The opt-out filter: one anti-join per match column against every list
/// (tombstones and, where it applies, the NDOO) at once.
fn not_in(lists: &[(&str, &'static str)]) -> String {
    let mut filters = vec!["TRUE".to_owned()];
    for column in ["patient_key", "patient_id"] {
        let selects: Vec<String> = lists
            .iter()
            .filter(|(_, c)| *c == column)
            .map(|(list, _)| format!("SELECT {column} FROM {list}"))
            .collect();
        if !selects.is_empty() {
            filters.push(format!("{column} NOT IN ({})", selects.join(" UNION ALL ")));
        }
    }
    filters.join(" AND ")
}

/// The SQL of each view; `{optouts}` becomes the opt-out filter. The
/// derived columns come from [`super::views`].
fn view_sql(table: &str) -> &'static str {
    match table {
        "patients" => {
            "SELECT patient_id, patient_key, practice_id, gpdp_age_band(birth_month) AS age_band, \
             sex, ethnicity, lsoa_code, imd_decile, \
             registration_end IS NULL AS registered, date_of_death IS NOT NULL AS deceased, \
             birth_month, registration_start, registration_end, date_of_death \
             FROM raw_patients WHERE {optouts}"
        }
        "clinical_events" => {
            "SELECT patient_id, patient_key, date, gpdp_year(date) AS event_year, snomedct_code, numeric_value \
             FROM raw_clinical_events WHERE {optouts}"
        }
        "medications" => {
            "SELECT patient_id, patient_key, date, gpdp_year(date) AS event_year, dmd_code, quantity \
             FROM raw_medications WHERE {optouts}"
        }
        "apcs" => {
            "SELECT patient_id, patient_key, admission_date, gpdp_year(admission_date) AS admission_year, \
             admission_method, primary_diagnosis, \
             {chapter(primary_diagnosis)} AS primary_diagnosis_chapter, \
             days_in_critical_care, discharge_destination \
             FROM raw_apcs WHERE {optouts}"
        }
        _ => {
            "SELECT patient_id, patient_key, date, gpdp_year(date) AS death_year, \
             underlying_cause_of_death, \
             {chapter(underlying_cause_of_death)} AS underlying_cause_chapter, place \
             FROM raw_ons_deaths WHERE {optouts}"
        }
    }
}

/// The ICD-10 chapter (I–XXII, WHO) of a code without dots, by the code's
/// place in the chapters' ranges (`D48` < `D5` < `D50`, so plain string
/// order finds it).
fn icd10_chapter(column: &str) -> String {
    const FROM: [(&str, &str); 21] = [
        ("C", "I"),
        ("D5", "II"),
        ("E", "III"),
        ("F", "IV"),
        ("G", "V"),
        ("H", "VI"),
        ("H6", "VII"),
        ("I", "VIII"),
        ("J", "IX"),
        ("K", "X"),
        ("L", "XI"),
        ("M", "XII"),
        ("N", "XIII"),
        ("O", "XIV"),
        ("P", "XV"),
        ("Q", "XVI"),
        ("R", "XVII"),
        ("S", "XVIII"),
        ("U", "XIX"),
        ("V", "XXII"),
        ("Z", "XX"),
    ];
    let mut sql = String::from("CASE");
    for (below, chapter) in FROM {
        sql += &format!(" WHEN {column} < '{below}' THEN '{chapter}'");
    }
    sql + " ELSE 'XXI' END"
}

/// The ICD-10 chapters, in order (the domain of the chapter columns).
pub const ICD10_CHAPTERS: [&str; 22] = [
    "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII", "XIII", "XIV", "XV",
    "XVI", "XVII", "XVIII", "XIX", "XX", "XXI", "XXII",
];

/// Refuses (`store_corrupt`) to read a store whose files are not what its
/// manifest recorded ([`crate::store::verify`]): every file the project's
/// views would read, checked before any is opened. The researcher is told
/// only that the store is corrupt; which file, and how, goes to the
/// operator, in the audit log (a file's name says nothing about a patient,
/// but the researcher has no use for it and the operator has).
pub fn verify(store: &Path, manifest: &Manifest, project: &Project) -> Result<(), TreError> {
    let mut files: Vec<&crate::store::FileEntry> = manifest
        .batches
        .values()
        // Deletion vectors too: a vector that is not the one committed must
        // not decide which rows are read.
        .flat_map(|b| b.files.values().chain(b.vectors.values()))
        .chain(&manifest.tombstones)
        .collect();
    if project.ndoo_applies {
        files.extend(&manifest.ndoo);
    }
    files.extend(
        manifest
            .linked
            .iter()
            .filter(|(name, _)| project.tables.iter().any(|t| t == *name))
            .map(|(_, l)| &l.file),
    );
    let bad = crate::store::verify::files(store, &files);
    if bad.is_empty() {
        return Ok(());
    }
    Err(corrupt(
        store,
        manifest,
        bad.iter().map(ToString::to_string).collect(),
    ))
}

/// The `store_corrupt` refusal for `bad` files (each `path (problem)`):
/// the details go to the audit log, the researcher is told only how many.
fn corrupt(store: &Path, manifest: &Manifest, bad: Vec<String>) -> TreError {
    let n = bad.len();
    let _ = crate::store::log::AuditLog::at(store).append(&[serde_json::json!({
        "event": "store_corrupt",
        "time": crate::store::now_rfc3339(),
        "generation": manifest.generation,
        "files": bad,
    })]);
    TreError::Refused(Refusal::new(
        "store_corrupt",
        format!(
            "{n} of the store's files do not match what its manifest recorded, so nothing was read; the TRE operator has the details in the audit log and must run `gpdp audit`"
        ),
    ))
}

/// Every batch's `table` file with its deletion vector, loaded and
/// verified ([`crate::store::vectors::load`]: the bytes read hash to the
/// manifest's SHA-256 and are bound to the data file in force). Fails
/// closed: any vector that does not load refuses the request
/// (`store_corrupt`), never a read of its file unmasked; a vector named
/// for a table the batch has no file of is refused too.
fn gp_files(
    store: &Path,
    manifest: &Manifest,
    table: &str,
) -> Result<Vec<(FileEntry, Option<DeletionVector>)>, TreError> {
    let (mut files, mut bad) = (Vec::new(), Vec::new());
    for batch in manifest.batches.values() {
        let vector = batch.vectors.get(table);
        let Some(data) = batch.files.get(table) else {
            if let Some(v) = vector {
                bad.push(format!("{} (a deletion vector for no data file)", v.path));
            }
            continue;
        };
        match vector.map(|v| crate::store::vectors::load(store, v, data)) {
            None => files.push((data.clone(), None)),
            Some(Ok(dv)) => files.push((data.clone(), Some(dv))),
            Some(Err(e)) => bad.push(e.to_string()),
        }
    }
    if bad.is_empty() {
        Ok(files)
    } else {
        Err(corrupt(store, manifest, bad))
    }
}

/// Builds the session for one request, its scans split into
/// [`PARTITIONS`].
pub async fn open(
    store: &Path,
    manifest: &Manifest,
    policy: &TrePolicy,
    project: &Project,
) -> Result<Session, TreError> {
    open_split(store, manifest, policy, project, PARTITIONS).await
}

/// [`open`], its scans split into `partitions`.
pub async fn open_split(
    store: &Path,
    manifest: &Manifest,
    policy: &TrePolicy,
    project: &Project,
    partitions: usize,
) -> Result<Session, TreError> {
    if manifest.batches.is_empty() {
        return Err(TreError::NoData);
    }
    verify(store, manifest, project)?;
    let internal = new_context(policy, partitions)?;
    for table in ["patients", "clinical_events", "medications"] {
        let files = gp_files(store, manifest, table)?;
        let provider = super::table::StoreTable::open(&internal.state(), store, files)
            .await
            .map_err(TreError::internal)?;
        internal
            .register_table(format!("raw_{table}"), Arc::new(provider))
            .map_err(TreError::internal)?;
    }
    internal.register_udf(super::views::year());
    internal.register_udf(super::views::age_band(crate::calendar::day_of(
        policy.age_on,
    )));
    let mut lists = Vec::new();
    if let Some(t) = &manifest.tombstones {
        let table = listing(&internal, store, std::slice::from_ref(&t.path)).await?;
        lists.push(("raw_tombstones", match_column(&table)));
        internal
            .register_table("raw_tombstones", table)
            .map_err(TreError::internal)?;
    }
    if project.ndoo_applies {
        // Fail closed: a project the opt-out applies to sees nothing until the list is in.
        let ndoo = manifest.ndoo.as_ref().ok_or_else(|| {
            TreError::Refused(Refusal::new(
                "ndoo_not_ingested",
                "the National Data Opt-out applies to this project and no NDOO list has been ingested (gpdp optout ingest)",
            ))
        })?;
        let table = listing(&internal, store, std::slice::from_ref(&ndoo.path)).await?;
        lists.push(("raw_ndoo", match_column(&table)));
        internal
            .register_table("raw_ndoo", table)
            .map_err(TreError::internal)?;
    }
    let optouts = not_in(&lists);
    // Provider data: the NDOO applies, a Type 1 opt-out does not (it stops
    // data leaving the GP practice; these records never came from one).
    let ndoo_only = not_in(
        &lists
            .iter()
            .copied()
            .filter(|(l, _)| *l == "raw_ndoo")
            .collect::<Vec<_>>(),
    );
    for source in crate::extract::Source::ALL {
        let name = source.name();
        if !project.tables.iter().any(|t| t == name) {
            continue;
        }
        let table: Arc<dyn datafusion::catalog::TableProvider> = match manifest.linked.get(name) {
            Some(l) => listing(&internal, store, std::slice::from_ref(&l.file.path)).await?,
            // Nothing linked yet: the view is there, and empty.
            None => Arc::new(
                datafusion::datasource::MemTable::try_new(
                    crate::store::schema::linked_schema(
                        source,
                        &crate::store::schema::default_linked_actions(source)
                            .map_err(TreError::internal)?,
                    ),
                    vec![vec![]],
                )
                .map_err(TreError::internal)?,
            ),
        };
        internal
            .register_table(format!("raw_{name}"), table)
            .map_err(TreError::internal)?;
    }

    let ctx = new_context(policy, partitions)?;
    let mut views = HashMap::new();
    for table in &project.tables {
        let linked = crate::extract::Source::from_name(table).is_some();
        let sql = view_sql(table)
            .replace("{optouts}", if linked { &ndoo_only } else { &optouts })
            .replace(
                "{chapter(primary_diagnosis)}",
                &icd10_chapter("primary_diagnosis"),
            )
            .replace(
                "{chapter(underlying_cause_of_death)}",
                &icd10_chapter("underlying_cause_of_death"),
            );
        let plan = internal
            .sql(&sql)
            .await
            .map_err(TreError::internal)?
            .into_unoptimized_plan();
        ctx.register_table(table.as_str(), Arc::new(ViewTable::new(plan.clone(), None)))
            .map_err(TreError::internal)?;
        views.insert(table.clone(), plan);
    }
    Ok(Session { ctx, views })
}

#[cfg(test)]
mod tests {
    use datafusion::execution::memory_pool::MemoryLimit;

    use super::*;

    /// The session a question runs in holds the TRE's limits: the policy's
    /// memory pool (a query past it fails, and fails closed, rather than
    /// taking the machine's memory), the partitions asked for, and no table
    /// functions or `information_schema` (the grammar refuses both first;
    /// this is the second line).
    #[tokio::test]
    async fn the_session_holds_the_policys_limits() {
        let mut policy = TrePolicy::load(None).unwrap();
        policy.memory_mb = 3;
        let ctx = new_context(&policy, 5).unwrap();
        let MemoryLimit::Finite(bytes) = ctx.runtime_env().memory_pool.memory_limit() else {
            panic!("the pool must be the policy's, bounded");
        };
        assert_eq!(bytes, 3 << 20);
        assert_eq!(ctx.state().config().target_partitions(), 5);
        for sql in [
            "SELECT * FROM generate_series(1, 3)",
            "SELECT * FROM range(3)",
            "SELECT * FROM information_schema.tables",
        ] {
            let answered = match ctx.sql(sql).await {
                Ok(df) => df.collect().await.is_ok(),
                Err(_) => false,
            };
            assert!(!answered, "{sql} must not run in a TRE session");
        }
    }
}
