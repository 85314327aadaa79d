//! The baseline peer of `benches/collect.sh`: plain CSV → Parquet of a
//! whole extract with gpdp's crates and codec and no de-identification.
//!
//! Usage: cargo run --release --example csv_to_parquet -- EXTRACT OUT [THREADS]

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(extract), Some(out)) = (args.get(1), args.get(2)) else {
        anyhow::bail!("usage: csv_to_parquet EXTRACT OUT [THREADS]");
    };
    let threads = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(2);
    let r = gpdp::bench::baseline::csv_to_parquet(
        extract.as_ref(),
        out.as_ref(),
        threads,
        gpdp::policy::Codec::Zstd(1),
    )?;
    println!(
        "{{\"rows\":{},\"bytes\":{},\"seconds\":{:.3},\"rows_per_second\":{:.0}}}",
        r.rows,
        r.bytes,
        r.seconds,
        r.rows as f64 / r.seconds
    );
    Ok(())
}
