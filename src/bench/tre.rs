//! TRE query latency: typical research queries through the boundary
//! (`tre::query`: authentication, a fresh session, plan guard, disclosure
//! control, audit) against the same SQL run directly in DataFusion over the
//! same views, in one run. Used by `gpdp bench` and `examples/tre_bench.rs`.

use std::path::Path;
use std::time::Instant;

use crate::policy::tre::TrePolicy;
use crate::tre::Boundary;

/// The queries: (name, SQL) over a project's views.
pub const QUERIES: [(&str, &str); 4] = [
    (
        "patients_by_sex_age",
        "SELECT sex, age_band, count(*) AS n FROM patients GROUP BY sex, age_band",
    ),
    (
        "diabetes_by_imd",
        "SELECT imd_decile, count(DISTINCT patient_id) AS n FROM patients WHERE patient_id IN (SELECT patient_id FROM clinical_events WHERE snomedct_code IN ('73211009', '46635009', '44054006')) GROUP BY imd_decile",
    ),
    (
        "hba1c_by_age",
        "SELECT p.age_band, count(*) AS tests, avg(c.numeric_value) AS mean FROM clinical_events c JOIN patients p ON c.patient_id = p.patient_id WHERE c.snomedct_code = '999791000000106' GROUP BY p.age_band",
    ),
    (
        "events_by_year",
        "SELECT event_year, count(*) AS n FROM clinical_events GROUP BY event_year",
    ),
];

#[derive(Debug, Clone, serde::Serialize)]
pub struct QueryLatency {
    pub query: &'static str,
    pub boundary_p50_ms: f64,
    pub boundary_p95_ms: f64,
    pub direct_p50_ms: f64,
    pub direct_p95_ms: f64,
    /// boundary p50 / direct p50 − 1.
    pub overhead: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The projects whose rule sets [`measure_rule_sets`] compares, over
/// the same queries: OpenSAFELY's rules (the baseline), the cell key
/// method and differential privacy.
pub const RULE_SETS: [&str; 3] = ["demo-opensafely", "demo-planning-exempt", "demo-research"];

/// The shipped policy, ready for any of its projects to be measured (here
/// and by [`super::privacy`]): a fixed perturbation key for the cell key
/// method beside it, and a privacy budget a benchmark cannot spend (each
/// charge is still a line of the audit log).
pub(crate) fn bench_boundary() -> anyhow::Result<Boundary> {
    let mut policy = TrePolicy::load(None)?;
    // The benchmark asks the same questions many times: no cell budget.
    for p in policy.projects.values_mut() {
        p.disclosure.cell_budget = None;
    }
    for r in &mut policy.researchers {
        r.rho_budget = f64::MAX / 4.0;
    }
    Ok(Boundary {
        record_keys: Some(crate::tre::aggregates::record_keys::RecordKeys::from_bytes(
            &[0x5a; 32],
        )),
        ..Boundary::new(policy)
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
        .enable_all()
        .build()?)
}

fn ask(
    rt: &tokio::runtime::Runtime,
    tre: &Boundary,
    store: &Path,
    project: &str,
    sql: &str,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    // Each shipped project's demo researcher (one per rule set).
    let (user, token) = crate::demo::researcher_for(project).unwrap_or(("", ""));
    let request = crate::tre::Request {
        store: store.to_owned(),
        user: user.into(),
        token: Some(token.into()),
        project: project.into(),
        sql: sql.into(),
    };
    rt.block_on(crate::tre::query(tre, &request))?;
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

/// Runs every query `runs` times through the boundary under OpenSAFELY's
/// rules and directly (the store must have its NDOO list).
pub fn measure(store: &Path, runs: usize) -> anyhow::Result<Vec<QueryLatency>> {
    measure_project(store, runs, RULE_SETS[0])
}

/// [`measure`] for any project of the shipped policy.
pub fn measure_project(
    store: &Path,
    runs: usize,
    project_name: &str,
) -> anyhow::Result<Vec<QueryLatency>> {
    let tre = bench_boundary()?;
    let policy = &tre.policy;
    let project = policy
        .projects
        .get(project_name)
        .ok_or_else(|| anyhow::anyhow!("no project {project_name} in the shipped policy"))?
        .clone();
    let rt = runtime()?;
    let manifest = crate::store::read_manifest(store)?;
    let direct = rt
        .block_on(crate::tre::session::open(
            store, &manifest, policy, &project,
        ))?
        .ctx;
    let mut out = Vec::new();
    for (name, sql) in QUERIES {
        let (mut boundary, mut plain) = (Vec::new(), Vec::new());
        for _ in 0..runs.max(1) {
            boundary.push(ask(&rt, &tre, store, project_name, sql)?);
            let t = Instant::now();
            rt.block_on(async { direct.sql(sql).await?.collect().await })?;
            plain.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        boundary.sort_by(f64::total_cmp);
        plain.sort_by(f64::total_cmp);
        out.push(QueryLatency {
            query: name,
            boundary_p50_ms: percentile(&boundary, 0.5),
            boundary_p95_ms: percentile(&boundary, 0.95),
            direct_p50_ms: percentile(&plain, 0.5),
            direct_p95_ms: percentile(&plain, 0.95),
            overhead: percentile(&boundary, 0.5) / percentile(&plain, 0.5) - 1.0,
        });
    }
    Ok(out)
}

/// One query's latency under each rule set, measured in the same run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuleSetCost {
    pub query: &'static str,
    /// Project → boundary p50 (ms).
    pub p50_ms: std::collections::BTreeMap<&'static str, f64>,
    /// Project → its p50 ÷ the OpenSAFELY project's p50.
    pub vs_opensafely: std::collections::BTreeMap<&'static str, f64>,
}

/// The cost of the cell key method and of differential privacy against
/// OpenSAFELY's rules over the same queries, interleaved run by run so
/// that the machine's drift falls on all of them alike.
pub fn measure_rule_sets(store: &Path, runs: usize) -> anyhow::Result<Vec<RuleSetCost>> {
    let tre = bench_boundary()?;
    let rt = runtime()?;
    let mut out = Vec::new();
    for (name, sql) in QUERIES {
        let mut times: std::collections::BTreeMap<&'static str, Vec<f64>> = Default::default();
        for _ in 0..runs.max(1) {
            for project in RULE_SETS {
                let ms = ask(&rt, &tre, store, project, sql)?;
                times.entry(project).or_default().push(ms);
            }
        }
        let p50_ms: std::collections::BTreeMap<&'static str, f64> = times
            .into_iter()
            .map(|(p, mut t)| {
                t.sort_by(f64::total_cmp);
                (p, percentile(&t, 0.5))
            })
            .collect();
        let base = p50_ms[RULE_SETS[0]];
        let vs_opensafely = p50_ms.iter().map(|(p, t)| (*p, t / base)).collect();
        out.push(RuleSetCost {
            query: name,
            p50_ms,
            vs_opensafely,
        });
    }
    Ok(out)
}

/// What verifying a store against its manifest costs a query
/// ([`crate::store::verify`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerificationCost {
    pub files: usize,
    pub bytes: u64,
    /// Hashing every file: what the first reader after a commit pays once
    /// (and what `gpdp audit` always pays).
    pub cold_ms: f64,
    /// A new process's check when the files are already verified: read the
    /// saved cache, stat every file (median of `runs`).
    pub warm_p50_ms: f64,
    /// A long-running process's check (`gpdp serve`), which remembers what
    /// it verified: stat every file (median of `runs`).
    pub in_process_p50_ms: f64,
    /// The fastest query's boundary p50 under OpenSAFELY's rules.
    pub fastest_query_p50_ms: f64,
    /// `warm_p50_ms` ÷ `fastest_query_p50_ms`.
    pub warm_share_of_fastest_query: f64,
}

/// Measures [`VerificationCost`] on `store` (queries asked `runs` times).
pub fn measure_verification(store: &Path, runs: usize) -> anyhow::Result<VerificationCost> {
    use crate::store::verify;
    let manifest = crate::store::read_manifest(store)?;
    let files: Vec<_> = manifest.all_files().collect();
    let bytes = files.iter().map(|f| f.bytes).sum();
    let t = Instant::now();
    for f in &files {
        crate::store::sha256_file(&store.join(&f.path))?;
    }
    let cold_ms = t.elapsed().as_secs_f64() * 1000.0;
    // Verified once, so that the saved cache holds every file.
    anyhow::ensure!(
        verify::files(store, &files).is_empty(),
        "{} does not match its manifest: run `gpdp audit`",
        store.display()
    );
    let mut warm = Vec::new();
    for _ in 0..runs.max(1) {
        verify::forget_in_memory();
        let t = Instant::now();
        let bad = verify::files(store, &files);
        warm.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(bad.is_empty(), "{} changed while measured", store.display());
    }
    warm.sort_by(f64::total_cmp);
    let mut in_process = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let bad = verify::files(store, &files);
        in_process.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(bad.is_empty(), "{} changed while measured", store.display());
    }
    in_process.sort_by(f64::total_cmp);
    let fastest = measure(store, runs)?
        .iter()
        .map(|q| q.boundary_p50_ms)
        .fold(f64::INFINITY, f64::min);
    let warm_p50_ms = percentile(&warm, 0.5);
    Ok(VerificationCost {
        files: files.len(),
        bytes,
        cold_ms,
        warm_p50_ms,
        in_process_p50_ms: percentile(&in_process, 0.5),
        fastest_query_p50_ms: fastest,
        warm_share_of_fastest_query: warm_p50_ms / fastest,
    })
}
