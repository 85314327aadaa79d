//! Boundary overhead on a store (see `gpdp::bench::tre`); `benches/tre.sh`
//! drives it and adds DuckDB on the same files as the peer a researcher
//! might use.
//!
//! Usage: cargo run --release --example tre_bench -- STORE [RUNS] [PROJECT | rule-sets]
//! PROJECT (a project of the shipped policy, default demo-opensafely):
//! one JSON object per query, boundary against direct DataFusion.
//! `rule-sets`: one JSON object per query with its latency under
//! OpenSAFELY's rules, the cell key method and differential privacy, all
//! in the same run, and the ratios to OpenSAFELY's. `verify`: one JSON
//! object, what checking the store against its manifest costs a query.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let store = args
        .get(1)
        .ok_or_else(|| anyhow::anyhow!("usage: tre_bench STORE [RUNS]"))?;
    let runs: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(7);
    match args.get(3).map_or("demo-opensafely", String::as_str) {
        "verify" => {
            let v = gpdp::bench::tre::measure_verification(store.as_ref(), runs)?;
            println!("{}", serde_json::to_string(&v)?);
        }
        "rule-sets" => {
            for q in gpdp::bench::tre::measure_rule_sets(store.as_ref(), runs)? {
                println!("{}", serde_json::to_string(&q)?);
            }
        }
        project => {
            for q in gpdp::bench::tre::measure_project(store.as_ref(), runs, project)? {
                println!("{}", serde_json::to_string(&q)?);
            }
        }
    }
    Ok(())
}
