//! Boundary overhead: typical research queries through the TRE boundary
//! (`gpdp::tre::query`: authentication, fresh session, plan guard, SDC,
//! audit) against the same SQL run directly in DataFusion over the same
//! views and Parquet files, in one run. `benches/tre.sh` drives it and adds
//! DuckDB on the same files as the peer a researcher might use.
//!
//! Usage: cargo run --release --example tre_bench -- STORE [RUNS]
//! Prints one JSON object per query.

use std::path::PathBuf;
use std::time::Instant;

use datafusion::prelude::SessionContext;
use gpdp::policy::tre::TrePolicy;

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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let store = PathBuf::from(
        args.get(1)
            .ok_or_else(|| anyhow::anyhow!("usage: tre_bench STORE [RUNS]"))?,
    );
    let runs: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(7);
    let policy = TrePolicy::load(None)?;
    let project = policy.projects["demo-research"].clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let manifest = gpdp::store::read_manifest(&store)?;
    // The direct peer: the same views (opt-out filters included) in a plain session.
    let direct: SessionContext = rt
        .block_on(gpdp::tre::session::open(
            &store, &manifest, &policy, &project,
        ))?
        .ctx;
    'queries: for (name, sql) in QUERIES {
        let mut boundary = Vec::new();
        let mut plain = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            let request = gpdp::tre::Request {
                store: store.clone(),
                user: "alice".into(),
                token: Some("demo-alice-token".into()),
                project: "demo-research".into(),
                sql: sql.into(),
            };
            if let Err(e) = rt.block_on(gpdp::tre::query(&policy, &request)) {
                println!("{{\"query\":\"{name}\",\"error\":{:?}}}", e.to_string());
                continue 'queries;
            }
            boundary.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            rt.block_on(async { direct.sql(sql).await?.collect().await })?;
            plain.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        boundary.sort_by(f64::total_cmp);
        plain.sort_by(f64::total_cmp);
        println!(
            "{{\"query\":\"{name}\",\"boundary_p50_ms\":{:.1},\"boundary_p95_ms\":{:.1},\"direct_p50_ms\":{:.1},\"direct_p95_ms\":{:.1},\"overhead\":{:.3}}}",
            percentile(&boundary, 0.5),
            percentile(&boundary, 0.95),
            percentile(&plain, 0.5),
            percentile(&plain, 0.95),
            percentile(&boundary, 0.5) / percentile(&plain, 0.5) - 1.0
        );
    }
    Ok(())
}
