//! `gpdp demo`: every stage on the embedded default population, and the
//! printing of what each stage did and where its outputs are (the stages
//! themselves run in the library's [`gpdp::demo`]).

use gpdp::demo::DemoOutcome;
use gpdp::progress::Progress;

use super::cli::DemoArgs;
use super::collect::print_collect_totals;
use super::default_threads;
use super::synth::print_synth;

pub fn run(args: DemoArgs, progress: &Progress) -> anyhow::Result<()> {
    let DemoArgs { out, threads } = args;
    let o = gpdp::demo::run(&out, default_threads(threads), progress)?;
    print_stages(&o);
    print_later_stages(&o);
    print_outputs(&o);
    o.audit.verdict()?;
    Ok(())
}

/// Stages 1 to 4: extracts, collection, linkage, questions to the TRE.
fn print_stages(o: &DemoOutcome) {
    println!(
        "gpdp demo — every stage on {} synthetic practices",
        gpdp::demo::DEMO_PRACTICES
    );
    println!();
    println!("1. Synthetic GP extracts (identifiable: the practice side)");
    print_synth(&o.report);
    println!();
    println!("2. Collection: de-identified on collection, Type 1 opt-outs honoured at source");
    print_collect_totals(&o.collection);
    println!();
    println!(
        "3. Linked at their providers with the same key (a Type 1 opt-out does not cover them; the NDOO does):"
    );
    for r in &o.linked {
        println!(
            "   {}: {} rows in, {} stored, {} quarantined (missing or invalid NHS numbers: they cannot link)",
            r.source,
            r.rows_in,
            r.rows_out,
            r.quarantined.values().sum::<u64>()
        );
    }
    println!(
        "   National Data Opt-out list ingested: {} patients, stored only as pseudonyms",
        o.ndoo.patients
    );
    println!();
    println!(
        "4. Research questions through the TRE boundary (one demo researcher per rule set; answers are disclosure-controlled)"
    );
    println!(
        "   Each researcher's effective guarantee: the weakest rule set they can reach over the same patients"
    );
    for g in &o.guarantees {
        println!(
            "   {:<6} {:<24} {}",
            g.user,
            if g.projects.is_empty() {
                "(no project)".to_owned()
            } else {
                g.projects.join(", ")
            },
            g.guarantee
        );
    }
    for q in &o.questions {
        println!();
        println!("  {} [{}, as {}]", q.title, q.project, q.user);
        println!("  SQL: {}", q.sql);
        match &q.answer {
            Ok(r) => {
                for line in gpdp::tre::output::to_table(r).lines() {
                    println!("    {line}");
                }
            }
            Err(e) => println!("    {e}"),
        }
    }
}

/// Stages 5 to 9: later opt-outs, audit, the TRE as a service, the
/// register and a patient's own answer.
fn print_later_stages(o: &DemoOutcome) {
    println!();
    let r = &o.later;
    println!(
        "5. Type 1 opt-outs registered after collection: {} patients ({} of them moved practice) deleted from every batch",
        r.applied,
        r.registrations_deleted.saturating_sub(r.applied)
    );
    println!(
        "   unreachable: {} rows ({}) masked by {} deletion vectors in {} practice batches, no data file rewritten",
        r.rows_removed.values().sum::<u64>(),
        r.rows_removed
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        r.files_masked,
        r.batches_masked,
    );
    if let Some(p) = &r.purge {
        println!(
            "   erased: the purge rewrote {} files in {} practice batches without them ({} rows)",
            p.files_rewritten,
            p.batches_rewritten,
            p.rows_erased.values().sum::<u64>()
        );
    }
    println!(
        "   in {:.2} s; proof of both phases in the audit log",
        r.seconds
    );
    println!();
    println!("6. Audit of the store against the ground truth");
    for line in o.audit.to_table().lines() {
        println!("   {line}");
    }
    println!();
    println!(
        "7. The TRE as a service: gpdp serve at grpc://{} (Arrow Flight SQL), researcher dana with the Rust Flight SQL client",
        o.flight.addr
    );
    println!("  SQL: {}", o.flight.sql);
    for line in gpdp::tre::output::batches_to_table(&o.flight.batches).lines() {
        println!("    {line}");
    }
    println!();
    println!(
        "8. Telling patients: the public data-uses register, and the log head to publish with it"
    );
    println!("   {}", o.register_page.display());
    println!("   head: {}", o.head);
    println!(
        "   check later that the log still extends it: gpdp audit --store {} --expect-head '<head>'",
        o.store.display()
    );
    println!();
    println!(
        "9. A patient's own answer at the practice (gpdp optout status), for the first later Type 1 request in {}",
        o.requests.display()
    );
    for line in o.status.to_text().lines() {
        println!("   {line}");
    }
}

/// Where every output is, and how to ask and audit it yourself.
fn print_outputs(o: &DemoOutcome) {
    println!();
    println!("Outputs:");
    println!(
        "  extracts (identifiable, practice side)  {}/practices/<ODS>/",
        o.extracts.display()
    );
    println!(
        "  National Data Opt-out list              {}/national/ndoo.csv",
        o.extracts.display()
    );
    println!(
        "  ground truth for audits                 {}/truth/",
        o.extracts.display()
    );
    println!(
        "  quarantined rows (practice side)        {}/quarantine/",
        o.extracts.display()
    );
    println!(
        "  collection key (practice side only)     {}",
        o.key.display()
    );
    println!(
        "  TRE perturbation key (TRE side only)    {}",
        o.perturbation_key.display()
    );
    println!(
        "  de-identified store (Parquet)           {}/tables/",
        o.store.display()
    );
    println!(
        "  receipts, one per practice              {}/receipts/",
        o.store.display()
    );
    println!(
        "  hash-chained audit log                  {}/audit/log.jsonl",
        o.store.display()
    );
    println!(
        "  later Type 1 opt-out requests           {}",
        o.requests.display()
    );
    println!(
        "  the report (open it in a browser)       {}",
        o.report_page.display()
    );
    println!(
        "  the public data-uses register           {}",
        o.register_page.display()
    );
    println!();
    println!("Ask your own question (demo credentials):");
    println!(
        "  GPDP_TOKEN=demo-dana-token cargo run --release -- query --store {} --project demo-research --user dana \"SELECT sex, count(*) AS n FROM patients GROUP BY sex\"",
        o.store.display()
    );
    println!(
        "  (demo-research answers with differential privacy and charges dana's budget; carol asks demo-planning-exempt, which needs --perturbation-key {}; alice asks demo-opensafely and priya demo-prescribing-acro, under deterministic rules; each token is demo-<user>-token)",
        o.perturbation_key.display()
    );
    println!(
        "Audit it yourself:\n  cargo run --release -- audit --store {} --truth {}/truth --key {}",
        o.store.display(),
        o.extracts.display(),
        o.key.display()
    );
}
