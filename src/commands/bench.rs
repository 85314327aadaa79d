//! `gpdp bench`: the arguments checked, then the benchmark run and its
//! figures printed (and written as bench.json and bench.html with --out).

use gpdp::progress::Progress;

use super::cli::BenchArgs;
use super::default_threads;

pub fn run(args: BenchArgs, progress: &Progress) -> anyhow::Result<()> {
    let BenchArgs {
        patients,
        practices,
        scale,
        threads,
        tre_runs,
        privacy_targets,
        privacy_only,
        reconstruction_counts,
        reconstruction_runs,
        data,
        json,
        out,
    } = args;
    if privacy_only && privacy_targets == 0 && reconstruction_counts == 0 {
        return Err(gpdp::error::BadInput(
            "--privacy-only measures the privacy attacks: --privacy-targets or --reconstruction-counts must be at least 1"
                .into(),
        )
        .into());
    }
    if reconstruction_runs == 0 {
        return Err(
            gpdp::error::BadInput("--reconstruction-runs must be at least 1".into()).into(),
        );
    }
    if patients == 0 || practices == 0 || scale.contains(&0) || threads.contains(&0) {
        return Err(gpdp::error::BadInput(
            "--patients, --practices and every --scale and --threads must be at least 1".into(),
        )
        .into());
    }
    let mut threads = if threads.is_empty() {
        vec![1, default_threads(None)]
    } else {
        threads
    };
    threads.sort_unstable();
    threads.dedup();
    let r = gpdp::bench::run::run(
        &gpdp::bench::run::BenchOptions {
            patients,
            practices,
            scales: scale,
            threads,
            data,
            tre_runs,
            privacy_targets,
            privacy_only,
            reconstruction_counts,
            reconstruction_runs,
        },
        progress,
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", r.to_table());
    }
    if let Some(out) = out {
        let page = r.write(&out)?;
        if !json {
            println!("\ncharts: {}", page.display());
        }
    }
    Ok(())
}
