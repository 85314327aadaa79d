//! Boundary overhead on a store (see `gpdp::bench::tre`); `benches/tre.sh`
//! drives it and adds DuckDB on the same files as the peer a researcher
//! might use.
//!
//! Usage: cargo run --release --example tre_bench -- STORE [RUNS] [PROJECT]
//! (PROJECT: a project of the shipped policy, default demo-research;
//! `demo-planning-exempt` measures the cell key method)
//! Prints one JSON object per query.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let store = args
        .get(1)
        .ok_or_else(|| anyhow::anyhow!("usage: tre_bench STORE [RUNS]"))?;
    let runs: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(7);
    let project = args.get(3).map_or("demo-research", String::as_str);
    for q in gpdp::bench::tre::measure_project(store.as_ref(), runs, project)? {
        println!("{}", serde_json::to_string(&q)?);
    }
    Ok(())
}
