//! The TRE's two lines of defence against a later opt-out, each alone
//! (issues 26 and 32): the deletion vectors applied at scan
//! (`gpdp::tre::table::StoreTable`) and the views' tombstone anti-join.
//!
//! Every store here is built from the same collected extract; the truth is
//! the stored bytes themselves (`read_table`), counted here. A patient is
//! masked in test code — a vector written with `store::vectors::write`
//! for each of their files and committed through `Store::commit`, with no
//! tombstone — or opted out by `gpdp optout apply` (vector and tombstone)
//! and then one line removed again by a commit made here. Each check has
//! its positive control: the same question on the same files without the
//! line counts the patient.
//!
//! Questions go to the project's views directly (exact answers; the
//! views are what every TRE answer reads) and, for the refusal, through
//! the boundary. The project is the NDOO-exempt one, so that the NDOO
//! filter plays no part.

use crate::common::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use gpdp::policy::tre::TrePolicy;
use gpdp::store::vectors::{self, DeletionVector};
use gpdp::tre::{Request, TreError};

const KEY_BYTE: u8 = 13;
const PROJECT: &str = "demo-planning-exempt";
const GP_TABLES: [&str; 3] = ["patients", "clinical_events", "medications"];

fn fixture() -> &'static Collected {
    static F: OnceLock<Collected> = OnceLock::new();
    F.get_or_init(|| collected_with_ndoo(2, 800, 43, KEY_BYTE))
}

/// A copy of the fixture's store, for one test to change.
fn copy_store(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    for (rel, bytes) in tree(&fixture().store) {
        let path = to.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    to
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn session(rt: &tokio::runtime::Runtime, store: &Path) -> datafusion::prelude::SessionContext {
    let policy = TrePolicy::load(None).unwrap();
    let manifest = gpdp::store::read_manifest(store).unwrap();
    rt.block_on(gpdp::tre::session::open(
        store,
        &manifest,
        &policy,
        &policy.projects[PROJECT],
    ))
    .unwrap()
    .ctx
}

/// The first column of `sql`'s answer over the project's views, as i64s.
fn ints(store: &Path, sql: &str) -> Vec<i64> {
    let rt = runtime();
    let ctx = session(&rt, store);
    let batches = rt
        .block_on(async { ctx.sql(sql).await?.collect().await })
        .unwrap();
    batches
        .iter()
        .flat_map(|b| {
            let c = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Int64).unwrap();
            let c = c.as_primitive::<Int64Type>().clone();
            (0..c.len()).map(move |i| c.value(i))
        })
        .collect()
}

fn count(store: &Path, sql: &str) -> i64 {
    ints(store, sql)[0]
}

/// The physical plan of `sql` over the views, as DataFusion prints it.
fn physical_plan(store: &Path, sql: &str) -> String {
    let rt = runtime();
    let ctx = session(&rt, store);
    let plan = rt
        .block_on(async { ctx.sql(sql).await?.create_physical_plan().await })
        .unwrap();
    datafusion::physical_plan::displayable(plan.as_ref())
        .indent(true)
        .to_string()
}

/// The target: the patient with the smallest patient key among those with
/// clinical events and prescriptions, with their pseudonym, key and NHS
/// number.
struct Target {
    pseudonym: [u8; 32],
    key: i64,
    nhs: String,
}

fn target() -> &'static Target {
    static T: OnceLock<Target> = OnceLock::new();
    T.get_or_init(|| {
        let c = fixture();
        let events: HashSet<[u8; 32]> = patient_ids(&read_table(&c.store, "clinical_events"))
            .into_iter()
            .collect();
        let meds: HashSet<[u8; 32]> = patient_ids(&read_table(&c.store, "medications"))
            .into_iter()
            .collect();
        let key_of = gpdp::deid::pseudonym::patient_key;
        let id = *events
            .intersection(&meds)
            .min_by_key(|p| key_of(p))
            .expect("a patient with events and prescriptions");
        let key = key_of(&id);
        let nhs = Csv::read(&c.extract.join("truth/patients.csv"))
            .records()
            .into_iter()
            .map(|r| r["nhs_number"].clone())
            .find(|n| pseudonym(KEY_BYTE, n) == id)
            .expect("the target is in the truth");
        Target {
            pseudonym: id,
            key,
            nhs,
        }
    })
}

/// Rows of `table` in the stored bytes: all, and the target's.
fn stored_rows(store: &Path, table: &str) -> (i64, i64) {
    let ids = patient_ids(&read_table(store, table));
    let theirs = ids.iter().filter(|p| **p == target().pseudonym).count();
    (ids.len() as i64, theirs as i64)
}

/// Masks the target's rows with a deletion vector per file, written and
/// committed here; no tombstone is written (the store's list, from
/// collection, does not hold them).
fn mask_by_vector_alone(store: &Path) {
    let mut s = gpdp::store::Store::open_for_write(store, false).unwrap();
    let mut next = s.manifest.clone();
    let who: HashSet<[u8; 32]> = [target().pseudonym].into();
    let mut masked = 0;
    for batch in next.batches.values_mut() {
        for table in GP_TABLES {
            let data = batch.files[table].clone();
            let positions =
                gpdp::store::parquet::positions_of(&store.join(&data.path), &who).unwrap();
            if positions.is_empty() {
                continue;
            }
            let dv = DeletionVector::new(&data, positions).unwrap();
            let name = data.path.replace(".parquet", ".test.dv");
            batch
                .vectors
                .insert(table.into(), vectors::write(store, &name, &dv).unwrap());
            masked += 1;
        }
    }
    assert!(masked >= 2, "the target's rows are in {masked} files");
    s.commit(next).unwrap();
}

/// Commits the store's manifest without its deletion vectors and/or its
/// tombstones: a weakened store, made only here.
pub(crate) fn strip(store: &Path, vectors: bool, tombstones: bool) {
    let mut s = gpdp::store::Store::open_for_write(store, false).unwrap();
    let mut next = s.manifest.clone();
    if vectors {
        for b in next.batches.values_mut() {
            b.vectors.clear();
        }
    }
    if tombstones {
        next.tombstones = None;
    }
    s.commit(next).unwrap();
}

fn has_vectors(store: &Path) -> bool {
    gpdp::store::read_manifest(store)
        .unwrap()
        .batches
        .values()
        .any(|b| !b.vectors.is_empty())
}

fn tombstoned(store: &Path) -> bool {
    gpdp::store::read_manifest(store)
        .unwrap()
        .tombstones
        .is_some_and(|t| {
            let bytes = read_parquet(&store.join(&t.path));
            patient_ids(&bytes).contains(&target().pseudonym)
        })
}

/// (a) A vector alone — no tombstone — makes the patient unreachable in
/// every GP view, and every count is the truth less their rows; on the
/// same files without the vector they are counted. (c) `count(*)` gives
/// the masked count, from a scan (no answer from Parquet footers). (d)
/// `ORDER BY patient_key LIMIT` never returns a masked row.
#[test]
fn a_deletion_vector_alone_makes_a_patient_unreachable_in_every_view() {
    let dir = tempfile::tempdir().unwrap();
    let masked = copy_store(dir.path(), "masked");
    mask_by_vector_alone(&masked);
    // No tombstone list at all: the views' filter is `TRUE`, the case where
    // a table with exact statistics answers `count(*)` from its footers.
    strip(&masked, false, true);
    assert!(has_vectors(&masked) && !tombstoned(&masked));
    let t = target();
    for table in GP_TABLES {
        let (all, theirs) = stored_rows(&masked, table);
        assert!(theirs > 0, "{table}: the target has rows in the files");
        let sql = format!("SELECT count(*) FROM {table}");
        assert_eq!(count(&masked, &sql), all - theirs, "{table}: {sql}");
        let sql = format!("SELECT count(*) FROM {table} WHERE patient_key = {}", t.key);
        assert_eq!(count(&masked, &sql), 0, "{table}: the target is reachable");
        let plan = physical_plan(&masked, &format!("SELECT count(*) FROM {table}"));
        assert!(
            plan.contains("DataSourceExec") && !plan.contains("PlaceholderRowExec"),
            "{table}: count(*) must be a scan, not an answer from statistics:\n{plan}"
        );
        let first = ints(
            &masked,
            &format!(
                "SELECT patient_key FROM {table} WHERE patient_key >= {} ORDER BY patient_key LIMIT 3",
                t.key
            ),
        );
        assert!(
            !first.contains(&t.key),
            "{table}: ORDER BY … LIMIT returned a masked row"
        );
        let sql = format!(
            "SELECT count(DISTINCT patient_id) FROM {table} WHERE patient_id IN \
             (SELECT patient_id FROM {table} ORDER BY patient_key LIMIT 1)"
        );
        assert_eq!(count(&masked, &sql), 1);
    }
    // The views over every table agree: the patient is in none.
    assert_eq!(
        count(
            &masked,
            &format!(
                "SELECT count(*) FROM patients p JOIN clinical_events e ON p.patient_id = e.patient_id WHERE p.patient_key = {}",
                t.key
            )
        ),
        0
    );

    // The positive control: the same files, the vector left out.
    let control = copy_store(dir.path(), "control");
    mask_by_vector_alone(&control);
    strip(&control, true, true);
    assert!(!has_vectors(&control) && !tombstoned(&control));
    for table in GP_TABLES {
        let (all, theirs) = stored_rows(&control, table);
        assert_eq!(
            count(&control, &format!("SELECT count(*) FROM {table}")),
            all
        );
        let sql = format!("SELECT count(*) FROM {table} WHERE patient_key = {}", t.key);
        assert_eq!(count(&control, &sql), theirs, "{table}: control");
        let first = ints(
            &control,
            &format!(
                "SELECT patient_key FROM {table} WHERE patient_key >= {} ORDER BY patient_key LIMIT 3",
                t.key
            ),
        );
        assert_eq!(
            first[0], t.key,
            "{table}: the control's first row is the target's"
        );
    }
}

/// (b) The tombstone anti-join alone — the vectors `gpdp optout apply`
/// wrote removed from the manifest here, the rows still in the files —
/// still hides the patient; without the tombstone too they are counted.
#[test]
fn the_tombstone_anti_join_alone_hides_a_patient_the_files_still_hold() {
    let dir = tempfile::tempdir().unwrap();
    let store = copy_store(dir.path(), "applied");
    let list = dir.path().join("type1.csv");
    std::fs::write(
        &list,
        format!("nhs_number,requested_at\n{},2024-06-01\n", target().nhs),
    )
    .unwrap();
    let o = optout_apply(&store, &fixture().key, &list)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(has_vectors(&store) && tombstoned(&store));
    let t = target();
    let theirs = |s: &Path, table: &str| {
        count(
            s,
            &format!("SELECT count(*) FROM {table} WHERE patient_key = {}", t.key),
        )
    };
    strip(&store, true, false);
    assert!(!has_vectors(&store) && tombstoned(&store));
    for table in GP_TABLES {
        let (all, stored) = stored_rows(&store, table);
        assert!(stored > 0, "{table}: apply rewrote no file");
        assert_eq!(theirs(&store, table), 0, "{table}: tombstone alone");
        let sql = format!("SELECT count(*) FROM {table}");
        assert_eq!(count(&store, &sql), all - stored, "{table}");
    }
    // The positive control: neither line.
    strip(&store, false, true);
    assert!(!has_vectors(&store) && !tombstoned(&store));
    for table in GP_TABLES {
        assert_eq!(
            theirs(&store, table),
            stored_rows(&store, table).1,
            "{table}"
        );
    }
}

fn ask(store: &Path) -> Result<gpdp::tre::Released, TreError> {
    let (user, token) = researcher_of(PROJECT);
    gpdp::tre::query_blocking(
        &ckm_boundary(),
        &Request {
            store: store.to_owned(),
            user: user.into(),
            token: Some(token.into()),
            project: PROJECT.into(),
            sql: "SELECT count(DISTINCT patient_id) FROM patients".into(),
        },
    )
}

/// (e) A vector whose bytes were edited refuses the request
/// (`store_corrupt`), whether the file check sees the change or the
/// vector's own check does (the verified-file cache fooled: same size,
/// modification time put back); the refusal names no file, patient, key
/// or pseudonym; the audit log names the vector for the operator.
#[test]
fn an_edited_deletion_vector_refuses_the_query_and_names_no_patient() {
    let dir = tempfile::tempdir().unwrap();
    let store = copy_store(dir.path(), "edited");
    mask_by_vector_alone(&store);
    ask(&store).expect("the masked store answers");
    let manifest = gpdp::store::read_manifest(&store).unwrap();
    let entry = manifest
        .batches
        .values()
        .find_map(|b| b.vectors.get("clinical_events"))
        .unwrap()
        .clone();
    let path = store.join(&entry.path);
    let original = std::fs::read(&path).unwrap();
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    let t = target();
    let forbidden = [
        gpdp::digest::hex(&t.pseudonym),
        t.key.to_string(),
        t.nhs.clone(),
        entry.path.clone(),
        ".dv".into(),
        "tables/".into(),
    ];
    // The last position moved one row on: a different row unmasked.
    let mut bytes = original.clone();
    let at = bytes.len() - 8;
    let last = u64::from_le_bytes(bytes[at..].try_into().unwrap());
    bytes[at..].copy_from_slice(&(last + 1).to_le_bytes());
    for restore_time in [false, true] {
        std::fs::write(&path, &bytes).unwrap();
        if restore_time {
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(modified)
                .unwrap();
        }
        match ask(&store) {
            Err(TreError::Refused(r)) => {
                assert_eq!(r.rule, "store_corrupt", "{r}");
                let text = r.to_string();
                for f in &forbidden {
                    assert!(!text.contains(f.as_str()), "the refusal names {f}: {text}");
                }
            }
            other => panic!("an edited vector was read (restore_time {restore_time}): {other:?}"),
        }
    }
    let log = std::fs::read_to_string(store.join("audit/log.jsonl")).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("store_corrupt") && l.contains(&entry.path)),
        "the operator is told which file"
    );
    // Put back, it answers again: the refusal was the vector's.
    std::fs::write(&path, &original).unwrap();
    ask(&store).expect("the vector restored");
}

/// On a store without vectors, the TRE's tables plan as `ListingTable`s
/// over the same files did: the same scans, split into the same
/// partitions, the same operators — except that no `count(*)` is answered
/// from footer statistics any more (see above).
#[test]
fn without_vectors_the_store_tables_plan_as_listing_tables_did() {
    use datafusion::datasource::file_format::parquet::ParquetFormat;
    use datafusion::datasource::listing::{
        ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
    };
    let store = &fixture().store;
    let manifest = gpdp::store::read_manifest(store).unwrap();
    let rt = runtime();
    let config = datafusion::prelude::SessionConfig::new().with_target_partitions(2);
    let (listing, ours) = (
        datafusion::prelude::SessionContext::new_with_config(config.clone()),
        datafusion::prelude::SessionContext::new_with_config(config),
    );
    rt.block_on(async {
        for table in GP_TABLES {
            let files: Vec<_> = manifest
                .batches
                .values()
                .map(|b| b.files[table].clone())
                .collect();
            let urls = files
                .iter()
                .map(|f| ListingTableUrl::parse(store.join(&f.path).to_string_lossy()).unwrap())
                .collect();
            let config = ListingTableConfig::new_with_multi_paths(urls)
                .with_listing_options(ListingOptions::new(std::sync::Arc::new(
                    ParquetFormat::default(),
                )))
                .infer_schema(&listing.state())
                .await
                .unwrap();
            listing
                .register_table(
                    table,
                    std::sync::Arc::new(ListingTable::try_new(config).unwrap()),
                )
                .unwrap();
            let files = files.into_iter().map(|f| (f, None)).collect();
            let provider = gpdp::tre::table::StoreTable::open(&ours.state(), store, files)
                .await
                .unwrap();
            assert_eq!(
                provider.schema(),
                listing.table_provider(table).await.unwrap().schema(),
                "{table}: the same types"
            );
            ours.register_table(table, std::sync::Arc::new(provider))
                .unwrap();
        }
    });
    use datafusion::catalog::TableProvider as _;
    for sql in [
        "SELECT sex, count(DISTINCT patient_id) FROM patients GROUP BY sex",
        "SELECT snomedct_code, count(*), avg(numeric_value) FROM clinical_events WHERE date >= '2020-01-01' GROUP BY snomedct_code",
        "SELECT p.sex, count(DISTINCT m.patient_id) FROM medications m JOIN patients p ON p.patient_id = m.patient_id WHERE m.dmd_code LIKE '3%' GROUP BY p.sex",
        "SELECT count(*) FROM clinical_events e WHERE e.patient_id IN (SELECT patient_id FROM medications)",
        "SELECT patient_key FROM clinical_events WHERE numeric_value > 40 ORDER BY patient_key LIMIT 5",
    ] {
        let plan = |ctx: &datafusion::prelude::SessionContext| {
            let plan = rt
                .block_on(async { ctx.sql(sql).await?.create_physical_plan().await })
                .unwrap();
            datafusion::physical_plan::displayable(plan.as_ref())
                .indent(false)
                .to_string()
        };
        assert_eq!(plan(&ours), plan(&listing), "{sql}");
    }
}

/// The row count the scan states to the planner is each table's live rows
/// — the manifest's rows less those its vectors mask — and inexact, so
/// that it guides the plan and answers nothing.
#[test]
fn the_scan_states_its_live_rows_and_only_as_an_estimate() {
    use datafusion::common::stats::Precision;
    use datafusion::datasource::TableProvider;
    use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};
    let dir = tempfile::tempdir().unwrap();
    let store = copy_store(dir.path(), "statistics");
    mask_by_vector_alone(&store);
    let manifest = gpdp::store::read_manifest(&store).unwrap();
    let rt = runtime();
    let ctx = datafusion::prelude::SessionContext::new();
    rt.block_on(async {
        for table in GP_TABLES {
            let (mut rows, mut masked) = (0u64, 0u64);
            let mut files = Vec::new();
            for b in manifest.batches.values() {
                let data = b.files[table].clone();
                let dv = b
                    .vectors
                    .get(table)
                    .map(|v| vectors::load(&store, v, &data).unwrap());
                rows += data.rows;
                masked += dv.as_ref().map_or(0, DeletionVector::masked_rows);
                files.push((data, dv));
            }
            assert!(
                masked > 0 || table == "patients",
                "{table}: the target's rows are masked"
            );
            let provider = gpdp::tre::table::StoreTable::open(&ctx.state(), &store, files)
                .await
                .unwrap();
            let scan = provider.scan(&ctx.state(), None, &[], None).await.unwrap();
            let stated = StatisticsContext::new()
                .compute(scan.as_ref(), &StatisticsArgs::new())
                .unwrap()
                .num_rows;
            assert_eq!(
                stated,
                Precision::Inexact((rows - masked) as usize),
                "{table}: {rows} rows, {masked} masked"
            );
        }
    });
}
