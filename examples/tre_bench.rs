//! Boundary overhead on a store (see `gpdp::bench::tre`); `benches/tre.sh`
//! drives it and adds DuckDB on the same files as the peer a researcher
//! might use.
//!
//! Usage: cargo run --release --example tre_bench -- STORE [RUNS]
//! Prints one JSON object per query.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let store = args
        .get(1)
        .ok_or_else(|| anyhow::anyhow!("usage: tre_bench STORE [RUNS]"))?;
    let runs: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(7);
    for q in gpdp::bench::tre::measure(store.as_ref(), runs)? {
        println!("{}", serde_json::to_string(&q)?);
    }
    Ok(())
}
