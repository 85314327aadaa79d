//! `gpdp synth`: synthetic GP extracts with their ground truth, and the
//! summary printed after them (also the demo's first stage).

use gpdp::policy::CollectionPolicy;
use gpdp::progress::Progress;
use gpdp::synth::{self, SynthOptions, SynthReport};

use super::cli::SynthArgs;
use super::default_threads;

pub fn run(args: SynthArgs, progress: &Progress) -> anyhow::Result<()> {
    let SynthArgs {
        out,
        practices,
        patients,
        seed,
        start_year,
        extract_date,
        policy,
        threads,
    } = args;
    let policy = CollectionPolicy::load(policy.as_deref())?;
    let opts = SynthOptions {
        out,
        practices,
        patients,
        seed,
        start_year,
        extract_date,
        threads: default_threads(threads),
        policy,
    };
    let report = synth::run(&opts, progress)?;
    print_synth(&report);
    Ok(())
}

pub fn print_synth(r: &SynthReport) {
    let t = &r.tally;
    let pct = |n: u64| 100.0 * n as f64 / t.persons.max(1) as f64;
    for w in &r.warnings {
        eprintln!("gpdp: warning: {w}");
    }
    println!(
        "wrote {} patients ({} registrations) to {}",
        t.persons,
        t.registrations,
        r.out.display()
    );
    println!(
        "  rows: {} patients, {} clinical events, {} medications; {} bad rows (listed in truth/bad_rows.csv)",
        t.rows[0],
        t.rows[1],
        t.rows[2],
        t.bad_by_table.iter().sum::<u64>()
    );
    println!(
        "  Type 1 opted out: {} ({:.1}%); National Data Opt-out: {} ({:.1}%); moved practice: {}; died: {}",
        t.type1_opted_out_persons,
        pct(t.type1_opted_out_persons),
        t.ndoo_persons,
        pct(t.ndoo_persons),
        t.movers,
        t.deaths
    );
    println!(
        "  {:.2}s: {:.2} M rows/s, {:.0} MB/s",
        r.elapsed.as_secs_f64(),
        r.rows_per_second() / 1e6,
        t.bytes as f64 / 1e6 / r.elapsed.as_secs_f64().max(1e-9)
    );
}
