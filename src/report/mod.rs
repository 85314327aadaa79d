//! `gpdp report`: the evidence that the commitments hold, as one page.
//!
//! [`build`] gathers every figure from the store (manifest, receipts,
//! tombstones, audit log, Parquet files and the TRE's own views) and, when
//! given, the generator's truth; [`html`] renders the same [`Report`] as a
//! self-contained HTML page with SVG charts, and `report.json` is the same
//! struct serialised ([`html::write`] writes both) — the numbers on the
//! page and in the JSON cannot disagree.
//!
//! `report.json` (schema `gpdp-report/1`): `collection` (rows in and out,
//! quarantine by reason, excluded codes, the policy's column actions and
//! hash, identifier checks), `optouts` (Type 1 at source, tombstones by
//! source, later deletions with backlog and latency, NDOO per project, the
//! audit verdict), `representativeness` (per dimension and group: the
//! population, the research population, the share retained and its
//! difference from the overall share), `reidentification` (k-anonymity over
//! the stored quasi-identifiers, shares of records in small classes, the
//! class-size distribution), `tre` (projects, each researcher's effective
//! guarantee, queries by outcome and rule, statistics redacted and rows
//! withheld, chain status, privacy budgets) and `throughput` (rows per second and time
//! from extract to research-ready data).

pub mod html;
pub mod linkage;
pub mod privacy;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use serde::Serialize;
use serde_json::Value;

use crate::collect::receipt::{Receipt, read_receipts};
use crate::extract::Table;
use crate::optout::apply::{LaterOptouts, later_optouts};
use crate::policy::tre::TrePolicy;
use crate::policy::{CollectionPolicy, ColumnAction, column_actions};
use crate::store::Manifest;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub generated_at: String,
    pub store: String,
    pub generation: u64,
    pub collection: Collection,
    pub optouts: Optouts,
    pub representativeness: Representativeness,
    pub reidentification: Risk,
    pub tre: Tre,
    pub throughput: Throughput,
    /// Linkage quality of provider data against the truth (with linked
    /// data, `--truth` and `--key`).
    pub linkage: Option<linkage::Linkage>,
    /// What an attacker learns through the boundary, measured against the
    /// truth on a store of the attacks' own ([`privacy`]).
    pub privacy_attacks: privacy::Shown,
    /// Seconds it took to build this report.
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Collection {
    pub practices: u64,
    pub rows_in: u64,
    /// Rows stored and not masked by a deletion vector: what readers see.
    pub rows_out: u64,
    /// Rows later opt-outs made unreachable that are still in the bytes,
    /// awaiting `gpdp optout purge`.
    pub rows_masked_awaiting_purge: u64,
    pub patients_out: u64,
    pub quarantined: BTreeMap<String, u64>,
    pub excluded_codes: BTreeMap<String, u64>,
    /// SHA-256 of the collection policies the current batches were collected under.
    pub policy_sha256: Vec<String>,
    /// Whether the built-in policy (whose actions are listed) is the one in force.
    pub policy_is_builtin: bool,
    pub columns: Vec<ColumnAction>,
    pub identifier_checks: Vec<crate::audit::Check>,
    /// Inputs the shrink guards held and that no later run took: a
    /// practice's batch or a provider source still as it was before them.
    pub held: Vec<HeldInput>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeldInput {
    pub time: String,
    /// `collect` or `link`.
    pub command: String,
    /// The practice or the provider source.
    pub input: String,
    pub rule: String,
    pub detail: String,
}

/// The holds in the log that no later commit of the same practice or
/// source replaced.
fn held_inputs(log: &[Value]) -> Vec<HeldInput> {
    let mut open: BTreeMap<(String, String), HeldInput> = BTreeMap::new();
    for e in log {
        let text = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
        match e["event"].as_str() {
            Some(event @ ("collect_held" | "link_held")) => {
                let command = event.trim_end_matches("_held").to_owned();
                let input = text(if command == "collect" {
                    "practice"
                } else {
                    "source"
                });
                open.insert(
                    (command.clone(), input.clone()),
                    HeldInput {
                        time: text("time"),
                        command,
                        input,
                        rule: text("rule"),
                        detail: text("detail"),
                    },
                );
            }
            Some("collect") => {
                open.remove(&("collect".to_owned(), text("practice")));
            }
            Some("link") => {
                open.remove(&("link".to_owned(), text("source")));
            }
            _ => {}
        }
    }
    open.into_values().collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct Optouts {
    /// Patients withheld at source because of a Type 1 dissent at their practice.
    pub type1_at_source: u64,
    /// Tombstones in force, by source kind: `type1_at_collection`, `type1_request`.
    pub tombstones: BTreeMap<String, u64>,
    pub later: LaterOptouts,
    /// Patients on the ingested NDOO list (`None`: no list ingested).
    pub ndoo_listed: Option<u64>,
    pub projects: Vec<ProjectPopulation>,
    /// The audit's checks (against the truth when `--truth` and `--key` are given).
    pub audit: crate::audit::AuditReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProjectPopulation {
    pub project: String,
    pub purpose: String,
    pub ndoo_applies: bool,
    /// Currently registered patients the project's views show (`None`: the
    /// views refuse, e.g. no NDOO list yet).
    pub registered_patients: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Representativeness {
    /// What the research population is compared with.
    pub baseline: String,
    /// The project whose views define the research population.
    pub research_project: String,
    pub population: u64,
    pub research: u64,
    pub retained_share: f64,
    pub dimensions: Vec<Dimension>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Dimension {
    pub name: String,
    pub groups: Vec<Group>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub value: String,
    pub population: u64,
    pub research: u64,
    pub retained_share: f64,
    /// retained_share − the overall retained share, in percentage points.
    pub difference_pp: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Risk {
    pub quasi_identifiers: Vec<&'static str>,
    pub records: u64,
    pub classes: u64,
    /// The smallest equivalence class.
    pub k_anonymity: u64,
    pub share_in_classes_below_5: f64,
    pub share_in_classes_below_10: f64,
    pub share_unique: f64,
    /// Records by class size bucket: "1", "2-4", "5-9", "10-19", "20+".
    pub records_by_class_size: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tre {
    pub projects: Vec<ProjectSummary>,
    /// Every researcher of the policy with their effective guarantee: the
    /// weakest rule set among the projects they reach over the same patients.
    pub researchers: Vec<ResearcherGuarantee>,
    pub queries: u64,
    pub released: u64,
    pub refused_by_rule: BTreeMap<String, u64>,
    pub errors: u64,
    /// Statistics redacted in released rows.
    pub cells_suppressed: u64,
    /// Rows withheld because all their statistics were redacted (never
    /// shown to the researcher; the audit log records them).
    pub rows_withheld: u64,
    pub chain_intact: bool,
    pub chain: String,
    /// Differential privacy: each researcher's spending on this store
    /// (from the ledger in the audit log) against their budget.
    pub privacy_budgets: Vec<Budget>,
    /// Per project and month: the figures the public register
    /// (`gpdp register`) publishes, computed by the same code.
    pub register_activity: Vec<crate::register::Activity>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResearcherGuarantee {
    pub user: String,
    pub projects: Vec<String>,
    /// The rule set of each project, in the same order.
    pub rule_sets: Vec<String>,
    /// `rho_bounded`, `cell_key`, `deterministic` or `no_project`.
    pub guarantee: String,
    /// The same, in words, e.g. "ρ-bounded (zCDP, ρ budget 2)".
    pub effective_guarantee: String,
    /// Why they may mix `dp` with another rule set, when the policy says.
    pub mixed_rules_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Budget {
    pub user: String,
    /// ρ (zCDP) spent on this store, across all the researcher's projects.
    pub rho_spent: f64,
    /// The policy's budget (absent for a researcher the policy no longer lists).
    pub rho_budget: Option<f64>,
    pub rho_remaining: Option<f64>,
    pub charges: u64,
    /// ρ spent as (ε, δ)-DP, at the δ of the policy's `dp` rule set.
    pub epsilon_spent: f64,
    pub delta: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProjectSummary {
    pub id: String,
    pub title: String,
    pub purpose: String,
    pub ndoo: String,
    pub disclosure: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub rows_in: u64,
    pub bytes_in: u64,
    /// From the first practice's start to the last batch's commit.
    pub extract_to_research_ready_seconds: f64,
    pub rows_per_second: f64,
}

/// Quasi-identifiers of the stored patients table.
pub const QUASI_IDENTIFIERS: [&str; 4] = ["birth_month", "sex", "lsoa_code", "ethnicity"];
/// The dimensions representativeness is shown by.
pub const DIMENSIONS: [&str; 4] = ["age_band", "sex", "ethnicity", "imd_decile"];

/// Where the truth is, and the key that pseudonymises it (for the audit).
pub struct TruthInput<'a> {
    pub dir: &'a Path,
    pub key: Option<&'a Path>,
}

/// Gathers every figure; the attacks' measurement shown is `privacy`'s
/// (a `privacy.json` of `gpdp bench --privacy-only`), else the shipped one.
pub fn build(
    store: &Path,
    truth: Option<TruthInput>,
    privacy: Option<&Path>,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let manifest = crate::store::read_manifest(store)?;
    let receipts = read_receipts(store, &manifest)?;
    let log = read_log(store)?;
    let policy = TrePolicy::load(None)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
        .enable_all()
        .build()?;

    let audit = crate::audit::audit(
        store,
        truth
            .as_ref()
            .and_then(|t| t.key.map(|key| crate::audit::Truth { dir: t.dir, key })),
        None,
    )?;
    // A report read from bytes the manifest did not record would describe
    // data nobody collected: name the files, and stop.
    if let Some(files) = audit
        .checks
        .iter()
        .find(|c| c.name == "files_match_manifest" && !c.passed)
    {
        return Err(crate::tre::TreError::Refused(crate::tre::Refusal::new(
            "store_corrupt",
            format!(
                "no report of {}: files_match_manifest failed — {}; run `gpdp audit`",
                store.display(),
                files.detail
            ),
        ))
        .into());
    }
    let tre = tre(&log, &policy, &audit);
    let collection = collection(store, &manifest, &receipts, &log, &rt)?;
    let optouts = optouts(store, &manifest, &receipts, &log, &policy, &rt, audit)?;
    let representativeness = representativeness(
        store,
        &manifest,
        &policy,
        truth.as_ref().map(|t| t.dir),
        &rt,
    )?;
    let reidentification = risk(store, &manifest, &rt)?;
    let throughput = throughput(&receipts, &log, &manifest);
    let privacy_attacks = privacy::shown(privacy, &policy.rules_sha256)?;
    let linkage = match &truth {
        Some(TruthInput {
            dir,
            key: Some(key),
        }) => linkage::build(store, &manifest, dir, key)?,
        _ => None,
    };
    Ok(Report {
        linkage,
        schema: "gpdp-report/1",
        generated_at: crate::store::now_rfc3339(),
        store: store.display().to_string(),
        generation: manifest.generation,
        collection,
        optouts,
        representativeness,
        reidentification,
        tre,
        throughput,
        privacy_attacks,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The audit log's entries, read as they are (the chain is checked separately).
fn read_log(store: &Path) -> anyhow::Result<Vec<Value>> {
    let path = store.join("audit/log.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|mut v| v["entry"].take())
        .collect())
}

/// Renders every value of a one-column result as text, with its count.
fn text_counts(batches: &[RecordBatch]) -> anyhow::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for b in batches {
        let keys = ArrayFormatter::try_new(b.column(0).as_ref(), &FormatOptions::default())?;
        let n = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::UInt64)?;
        let n = n.as_primitive::<arrow::datatypes::UInt64Type>();
        for i in 0..b.num_rows() {
            let key = if b.column(0).is_null(i) {
                "(none)".to_owned()
            } else {
                keys.value(i).to_string()
            };
            out.push((key, n.value(i)));
        }
    }
    Ok(out)
}

fn collection(
    store: &Path,
    manifest: &Manifest,
    receipts: &[Receipt],
    log: &[Value],
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Collection> {
    let mut quarantined = BTreeMap::new();
    let mut excluded = BTreeMap::new();
    for r in receipts {
        for (k, v) in &r.quarantined {
            *quarantined.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &r.excluded_codes {
            *excluded.entry(k.clone()).or_default() += v;
        }
    }
    let hashes: BTreeSet<String> = receipts.iter().map(|r| r.policy_sha256.clone()).collect();
    let builtin = CollectionPolicy::load(None)?;
    let columns = column_actions(&builtin);
    Ok(Collection {
        practices: receipts.len() as u64,
        rows_in: receipts.iter().map(Receipt::rows_in_total).sum(),
        // Rows readers see: the stored rows less those deletion vectors mask.
        rows_out: manifest
            .batches
            .values()
            .flat_map(|b| b.files.values())
            .map(|f| f.rows)
            .sum::<u64>()
            - rows_masked(manifest),
        rows_masked_awaiting_purge: rows_masked(manifest),
        patients_out: receipts.iter().map(|r| r.patients_out).sum(),
        quarantined,
        excluded_codes: excluded,
        policy_is_builtin: hashes.len() == 1 && hashes.contains(&builtin.sha256),
        policy_sha256: hashes.into_iter().collect(),
        columns,
        identifier_checks: identifier_checks(store, manifest, rt)?,
        held: held_inputs(log),
    })
}

/// Proof that no direct identifier reached the store: what its files hold.
fn identifier_checks(
    store: &Path,
    manifest: &Manifest,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Vec<crate::audit::Check>> {
    const IDENTIFIERS: [&str; 7] = [
        "nhs_number",
        "given_name",
        "family_name",
        "date_of_birth",
        "postcode",
        "free_text",
        "telephone",
    ];
    let ctx = SessionContext::new();
    let mut named = Vec::new();
    let mut not_pseudonyms = Vec::new();
    let mut suspicious = 0u64;
    let mut scanned = 0u64;
    for table in Table::ALL {
        let files = table_files(store, manifest, table.name());
        if files.is_empty() {
            continue;
        }
        let df = rt.block_on(ctx.read_parquet(files, ParquetReadOptions::default()))?;
        let schema = df.schema().as_arrow().clone();
        for f in schema.fields() {
            if IDENTIFIERS.contains(&f.name().as_str()) {
                named.push(format!("{}.{}", table.name(), f.name()));
            }
            if ["patient_id", "practice_id"].contains(&f.name().as_str())
                && f.data_type() != &arrow::datatypes::DataType::FixedSizeBinary(32)
            {
                not_pseudonyms.push(format!("{}.{}", table.name(), f.name()));
            }
        }
        // Free-form text columns (codes are checked against code lists at collection).
        if table == Table::Patients {
            let batches = rt.block_on(df.collect())?;
            for b in &batches {
                for (field, column) in b.schema().fields().iter().zip(b.columns()) {
                    if !matches!(
                        field.data_type(),
                        arrow::datatypes::DataType::Utf8 | arrow::datatypes::DataType::Utf8View
                    ) {
                        continue;
                    }
                    let text = arrow::compute::cast(column, &arrow::datatypes::DataType::Utf8)?;
                    for v in text.as_string::<i32>().iter().flatten() {
                        scanned += 1;
                        if looks_identifying(v) {
                            suspicious += 1;
                        }
                    }
                }
            }
        }
    }
    let check = |name, passed, detail: String| crate::audit::Check {
        name,
        passed,
        detail,
    };
    Ok(vec![
        check(
            "no_identifier_columns",
            named.is_empty(),
            if named.is_empty() {
                format!("no stored column is named {}", IDENTIFIERS.join(", "))
            } else {
                format!("identifier columns in the store: {}", named.join(", "))
            },
        ),
        check(
            "identifiers_are_pseudonyms",
            not_pseudonyms.is_empty(),
            if not_pseudonyms.is_empty() {
                "patient_id and practice_id are 32-byte keyed pseudonyms in every table".into()
            } else {
                format!("not 32-byte pseudonyms: {}", not_pseudonyms.join(", "))
            },
        ),
        check(
            "no_identifier_values",
            suspicious == 0,
            format!(
                "{scanned} text values of the patients table scanned: {suspicious} look like an NHS number or a full postcode"
            ),
        ),
    ])
}

/// A valid NHS number (10 digits, Modulus 11) or a full UK postcode.
fn looks_identifying(v: &str) -> bool {
    let digits: String = v.chars().filter(|c| !c.is_whitespace()).collect();
    if digits.len() == 10
        && digits.bytes().all(|b| b.is_ascii_digit())
        && crate::nhs_number::NhsNumber::parse(digits.as_bytes()).is_ok()
    {
        return true;
    }
    // Outward code, space, inward code (digit + two letters): "QA1 0AA".
    let parts: Vec<&str> = v.split(' ').collect();
    parts.len() == 2
        && (2..=4).contains(&parts[0].len())
        && parts[0]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_uppercase())
        && parts[1].len() == 3
        && parts[1].as_bytes()[0].is_ascii_digit()
        && parts[1][1..].chars().all(|c| c.is_ascii_uppercase())
}

/// Rows the deletion vectors in force mask (a vector's `rows`).
fn rows_masked(manifest: &Manifest) -> u64 {
    manifest
        .batches
        .values()
        .flat_map(|b| b.vectors.values())
        .map(|v| v.rows)
        .sum()
}

/// Every `table` file of the store read through the store's reader,
/// deletion vectors applied (fails closed), as one in-memory table.
fn masked_table(
    store: &Path,
    manifest: &Manifest,
    table: &str,
) -> anyhow::Result<Option<datafusion::datasource::MemTable>> {
    let mut schema = None;
    let mut batches = Vec::new();
    for batch in manifest
        .batches
        .values()
        .filter(|b| b.files.contains_key(table))
    {
        let reader = crate::store::parquet::open(store, batch, table)?.build()?;
        schema.get_or_insert_with(|| arrow::array::RecordBatchReader::schema(&reader));
        for b in reader {
            batches.push(b?);
        }
    }
    let Some(schema) = schema else {
        return Ok(None);
    };
    Ok(Some(datafusion::datasource::MemTable::try_new(
        schema,
        vec![batches],
    )?))
}

fn table_files(store: &Path, manifest: &Manifest, table: &str) -> Vec<String> {
    manifest
        .batches
        .values()
        .filter_map(|b| b.files.get(table))
        .map(|f| store.join(&f.path).to_string_lossy().into_owned())
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn optouts(
    store: &Path,
    manifest: &Manifest,
    receipts: &[Receipt],
    log: &[Value],
    policy: &TrePolicy,
    rt: &tokio::runtime::Runtime,
    audit: crate::audit::AuditReport,
) -> anyhow::Result<Optouts> {
    let mut tombstones = BTreeMap::new();
    if let Some(t) = &manifest.tombstones {
        for t in crate::store::read_tombstones(&store.join(&t.path))? {
            let kind = if t.source == crate::optout::apply::REQUEST_SOURCE {
                "type1_request"
            } else {
                "type1_at_collection"
            };
            *tombstones.entry(kind.to_owned()).or_insert(0u64) += 1;
        }
    }
    let later = later_optouts(log);
    let mut projects = Vec::new();
    for p in policy.projects.values() {
        let registered = match rt.block_on(crate::tre::session::open(store, manifest, policy, p)) {
            Ok(s) if p.tables.iter().any(|t| t == "patients") => {
                let batches = rt.block_on(async {
                    s.ctx
                        .sql("SELECT count(DISTINCT patient_id) FROM patients WHERE registered")
                        .await?
                        .collect()
                        .await
                })?;
                batches.first().map(|b| {
                    b.column(0)
                        .as_primitive::<arrow::datatypes::Int64Type>()
                        .value(0) as u64
                })
            }
            _ => None,
        };
        projects.push(ProjectPopulation {
            project: p.id.clone(),
            purpose: p.purpose.clone(),
            ndoo_applies: p.ndoo_applies,
            registered_patients: registered,
        });
    }
    Ok(Optouts {
        type1_at_source: receipts.iter().map(|r| r.type1_excluded_patients).sum(),
        tombstones,
        later,
        ndoo_listed: manifest.ndoo.as_ref().map(|n| n.rows),
        projects,
        audit,
    })
}

/// Distinct registered patients per group of `dimension` in a project's views.
fn view_groups(
    session: &crate::tre::session::Session,
    dimension: &str,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let sql = format!(
        "SELECT {dimension}, count(DISTINCT patient_id) FROM patients WHERE registered GROUP BY {dimension}"
    );
    let batches = rt.block_on(async { session.ctx.sql(&sql).await?.collect().await })?;
    Ok(text_counts(&batches)?.into_iter().collect())
}

fn representativeness(
    store: &Path,
    manifest: &Manifest,
    policy: &TrePolicy,
    truth: Option<&Path>,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Representativeness> {
    let open = |p: &crate::policy::tre::Project| {
        rt.block_on(crate::tre::session::open(store, manifest, policy, p))
            .map_err(|e| anyhow::anyhow!("opening {}'s views: {e}", p.id))
    };
    let with_patients = |p: &&crate::policy::tre::Project| p.tables.iter().any(|t| t == "patients");
    let research = policy
        .projects
        .values()
        .filter(with_patients)
        .find(|p| p.ndoo_applies && p.purpose == "research")
        .context("the TRE policy has no research project the NDOO applies to")?;
    let research_session = open(research);
    let mut research_counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut population: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let baseline;
    if let Some(dir) = truth {
        baseline = "the full registered population (the generator's truth: every person registered at extract, before any opt-out)".to_owned();
        let path = dir.join("patients.csv");
        let mut reader = csv::Reader::from_path(&path)
            .map_err(|e| crate::error::BadInput(format!("cannot read {}: {e}", path.display())))?;
        let headers = reader.headers()?.clone();
        let at = |n: &str| {
            headers
                .iter()
                .position(|h| h == n)
                .with_context(|| format!("{} has no column {n}", path.display()))
        };
        let registered = at("registered_at_extract")?;
        let columns: Vec<(String, usize)> = DIMENSIONS
            .iter()
            .map(|d| Ok(((*d).to_owned(), at(d)?)))
            .collect::<anyhow::Result<_>>()?;
        for r in reader.records() {
            let r = r?;
            if &r[registered] != "true" {
                continue;
            }
            for (d, i) in &columns {
                *population
                    .entry(d.clone())
                    .or_default()
                    .entry(r[*i].to_owned())
                    .or_default() += 1;
            }
        }
    } else {
        let exempt = policy
            .projects
            .values()
            .filter(with_patients)
            .find(|p| !p.ndoo_applies)
            .context("without --truth the report compares with a project the NDOO does not apply to, and the policy has none")?;
        baseline = format!(
            "the stored registered population (Type 1 dissenters already excluded; through {}'s views); pass --truth to compare with the full population",
            exempt.id
        );
        let s = open(exempt)?;
        for d in DIMENSIONS {
            population.insert(d.to_owned(), view_groups(&s, d, rt)?);
        }
    }
    // Without an NDOO list the research views refuse: nobody is retained (fail closed).
    if let Ok(s) = &research_session {
        for d in DIMENSIONS {
            research_counts.insert(d.to_owned(), view_groups(s, d, rt)?);
        }
    }
    let total = |m: &BTreeMap<String, BTreeMap<String, u64>>| -> u64 {
        m.get("sex").map_or(0, |g| g.values().sum())
    };
    let (pop, res) = (total(&population), total(&research_counts));
    let overall = if pop == 0 {
        0.0
    } else {
        res as f64 / pop as f64
    };
    let dimensions = DIMENSIONS
        .iter()
        .map(|d| {
            let p = population.get(*d).cloned().unwrap_or_default();
            let r = research_counts.get(*d).cloned().unwrap_or_default();
            let keys: BTreeSet<&String> = p.keys().chain(r.keys()).collect();
            let mut groups: Vec<Group> = keys
                .into_iter()
                .map(|k| {
                    let population = p.get(k).copied().unwrap_or(0);
                    let research = r.get(k).copied().unwrap_or(0);
                    let share = if population == 0 {
                        0.0
                    } else {
                        research as f64 / population as f64
                    };
                    Group {
                        value: k.clone(),
                        population,
                        research,
                        retained_share: share,
                        difference_pp: 100.0 * (share - overall),
                    }
                })
                .collect();
            groups.sort_by_key(|g| natural(&g.value));
            Dimension {
                name: (*d).to_owned(),
                groups,
            }
        })
        .collect();
    Ok(Representativeness {
        baseline,
        research_project: research.id.clone(),
        population: pop,
        research: res,
        retained_share: overall,
        dimensions,
    })
}

/// Sort key that puts "2" before "10" and "0-15" before "16-29".
fn natural(s: &str) -> (u64, String) {
    let lead: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
    (lead.parse().unwrap_or(u64::MAX), s.to_owned())
}

fn risk(store: &Path, manifest: &Manifest, rt: &tokio::runtime::Runtime) -> anyhow::Result<Risk> {
    let qi = QUASI_IDENTIFIERS.join(", ");
    let mut sizes: BTreeMap<u64, u64> = BTreeMap::new();
    // The patients readers can reach: deletion vectors applied.
    if let Some(table) = masked_table(store, manifest, Table::Patients.name())? {
        let ctx = SessionContext::new();
        ctx.register_table("stored_patients", std::sync::Arc::new(table))?;
        // One record per patient and profile: a patient who moved keeps one
        // record unless their area changed.
        let sql = format!(
            "SELECT n, count(*) FROM (SELECT count(*) AS n FROM \
             (SELECT DISTINCT patient_id, {qi} FROM stored_patients) GROUP BY {qi}) GROUP BY n"
        );
        let batches = rt.block_on(async { ctx.sql(&sql).await?.collect().await })?;
        for (size, classes) in text_counts(&batches)? {
            sizes.insert(size.parse()?, classes);
        }
    }
    let records: u64 = sizes.iter().map(|(n, c)| n * c).sum();
    let share = |pred: &dyn Fn(u64) -> bool| {
        let n: u64 = sizes
            .iter()
            .filter(|(s, _)| pred(**s))
            .map(|(s, c)| s * c)
            .sum();
        if records == 0 {
            0.0
        } else {
            n as f64 / records as f64
        }
    };
    let mut buckets = BTreeMap::new();
    for (label, lo, hi) in [
        ("1", 1, 1),
        ("2-4", 2, 4),
        ("5-9", 5, 9),
        ("10-19", 10, 19),
        ("20+", 20, u64::MAX),
    ] {
        let n: u64 = sizes.range(lo..=hi).map(|(s, c)| s * c).sum();
        buckets.insert(label.to_owned(), n);
    }
    Ok(Risk {
        quasi_identifiers: QUASI_IDENTIFIERS.to_vec(),
        records,
        classes: sizes.values().sum(),
        k_anonymity: sizes.keys().next().copied().unwrap_or(0),
        share_in_classes_below_5: share(&|s| s < 5),
        share_in_classes_below_10: share(&|s| s < 10),
        share_unique: share(&|s| s == 1),
        records_by_class_size: buckets,
    })
}

fn tre(log: &[Value], policy: &TrePolicy, audit: &crate::audit::AuditReport) -> Tre {
    let queries: Vec<&Value> = log.iter().filter(|e| e["event"] == "query").collect();
    let mut refused_by_rule = BTreeMap::new();
    for q in queries.iter().filter(|q| q["outcome"] == "refused") {
        let rule = q["rule"].as_str().unwrap_or("unknown").to_owned();
        *refused_by_rule.entry(rule).or_insert(0u64) += 1;
    }
    // The audit has verified the chain already.
    let (chain_intact, chain) = audit
        .checks
        .iter()
        .find(|c| c.name == "audit_log_intact")
        .map_or((false, "not checked".to_owned()), |c| {
            (c.passed, c.detail.clone())
        });
    Tre {
        projects: policy
            .projects
            .values()
            .map(|p| ProjectSummary {
                id: p.id.clone(),
                title: p.title.clone(),
                purpose: p.purpose.clone(),
                ndoo: if p.ndoo_applies {
                    "applies".to_owned()
                } else {
                    format!("exempt: {}", p.exemption.clone().unwrap_or_default())
                },
                disclosure: p.disclosure.name.to_owned(),
            })
            .collect(),
        researchers: policy
            .researchers
            .iter()
            .map(|r| {
                let guarantee = policy.effective_guarantee(r);
                ResearcherGuarantee {
                    user: r.user.clone(),
                    projects: r.projects.clone(),
                    rule_sets: policy.rule_sets_of(r),
                    guarantee: guarantee.code().to_owned(),
                    effective_guarantee: guarantee.to_string(),
                    mixed_rules_reason: r.mixed_rules_reason.clone(),
                }
            })
            .collect(),
        queries: queries.len() as u64,
        released: queries
            .iter()
            .filter(|q| q["outcome"] == "released")
            .count() as u64,
        errors: queries
            .iter()
            .filter(|q| q["outcome"] == "error" || q["outcome"] == "failed")
            .count() as u64,
        refused_by_rule,
        // `suppressed_cells` is what logs written before per-statistic control called it.
        cells_suppressed: queries
            .iter()
            .filter_map(|q| {
                q["redacted_cells"]
                    .as_u64()
                    .or_else(|| q["suppressed_cells"].as_u64())
            })
            .sum(),
        rows_withheld: queries
            .iter()
            .filter_map(|q| q["withheld_rows"].as_u64())
            .sum(),
        chain_intact,
        chain,
        privacy_budgets: budgets(log, policy),
        register_activity: crate::register::activity(log),
    }
}

/// Every researcher who has spent privacy budget on this store, and every
/// researcher of a `dp` project, with their ledger.
fn budgets(log: &[Value], policy: &TrePolicy) -> Vec<Budget> {
    let delta = policy
        .projects
        .values()
        .find_map(|p| p.disclosure.dp.map(|d| d.delta))
        .unwrap_or(1e-6);
    let mut ledger = crate::tre::control::dp::Spending::default();
    log.iter().for_each(|e| ledger.add(e));
    let mut spent: BTreeMap<String, (f64, u64)> = ledger
        .by_user
        .into_iter()
        .map(|(user, rho)| {
            let charges = ledger.charges.get(&user).copied().unwrap_or(0);
            (user, (rho, charges))
        })
        .collect();
    for r in &policy.researchers {
        let in_dp = r.projects.iter().any(|p| {
            policy
                .projects
                .get(p)
                .is_some_and(|p| p.disclosure.dp.is_some())
        });
        if in_dp {
            spent.entry(r.user.clone()).or_default();
        }
    }
    spent
        .into_iter()
        .map(|(user, (rho, charges))| {
            let budget = policy.researcher(&user).map(|r| r.rho_budget);
            Budget {
                rho_remaining: budget.map(|b| (b - rho).max(0.0)),
                rho_budget: budget,
                epsilon_spent: crate::tre::control::dp::epsilon(rho, delta),
                delta,
                rho_spent: rho,
                charges,
                user,
            }
        })
        .collect()
}

fn throughput(receipts: &[Receipt], log: &[Value], manifest: &Manifest) -> Throughput {
    let parse = |s: &str| chrono::DateTime::parse_from_rfc3339(s).ok();
    let start = receipts.iter().filter_map(|r| parse(&r.started)).min();
    // The commit of each current batch, from its `collect` entry.
    let batches: BTreeSet<&str> = manifest
        .batches
        .values()
        .map(|b| b.batch.as_str())
        .collect();
    let ready = log
        .iter()
        .filter(|e| e["event"] == "collect")
        .filter(|e| e["batch"].as_str().is_some_and(|b| batches.contains(b)))
        .filter_map(|e| e["time"].as_str().and_then(parse))
        .max();
    let seconds = match (start, ready) {
        (Some(s), Some(r)) => ((r - s).num_milliseconds().max(1)) as f64 / 1000.0,
        _ => 0.0,
    };
    let rows_in: u64 = receipts.iter().map(Receipt::rows_in_total).sum();
    Throughput {
        rows_in,
        bytes_in: receipts.iter().map(|r| r.bytes_in).sum(),
        extract_to_research_ready_seconds: seconds,
        rows_per_second: if seconds > 0.0 {
            rows_in as f64 / seconds
        } else {
            0.0
        },
    }
}
