//! `gpdp collect`: de-identification on collection, and the per-practice
//! lines and totals printed after it (the totals also in the demo).

use gpdp::collect::{CollectOptions, CollectSummary};
use gpdp::policy::CollectionPolicy;
use gpdp::progress::Progress;

use super::cli::CollectArgs;
use super::default_threads;

pub fn run(args: CollectArgs, progress: &Progress) -> anyhow::Result<()> {
    let CollectArgs {
        extract,
        store,
        key,
        policy,
        practices,
        quarantine,
        threads,
        json,
        accept_shrink,
    } = args;
    let opts = gpdp::collect::CollectOptions {
        extract,
        store,
        key,
        policy: CollectionPolicy::load(policy.as_deref())?,
        practices,
        threads: default_threads(threads),
        quarantine,
        accept_shrink,
    };
    let summary = gpdp::collect::run(&opts, progress)?;
    let held = summary.held();
    if json {
        let receipts: Vec<_> = summary.receipts().collect();
        let held_json: Vec<_> = held
            .iter()
            .map(|(practice, h)| serde_json::json!({"practice": practice, "held": h.rule, "detail": h.detail}))
            .collect();
        let out = serde_json::json!({"totals": gpdp::collect::totals(&summary), "receipts": receipts, "held": held_json});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_collect(&opts, &summary);
    }
    if !held.is_empty() {
        return Err(gpdp::store::guard::HeldInputs(held).into());
    }
    Ok(())
}

fn print_collect(opts: &CollectOptions, s: &CollectSummary) {
    use gpdp::collect::Outcome;
    println!(
        "collected {} practices into {} (store generation {})",
        s.outcomes.len(),
        opts.store.display(),
        s.generation
    );
    for o in &s.outcomes {
        match o {
            Outcome::Unchanged { practice, batch } => println!(
                "  {practice}  batch {batch}  unchanged (this extract is already in the store)"
            ),
            Outcome::Held { receipt: r, held } => println!(
                "  {}  batch {}  HELD by rule {}: {}; the batch in force stays",
                r.practice, r.batch, held.rule, held.detail
            ),
            Outcome::Committed {
                receipt: r,
                deleted_elsewhere,
            } => {
                let mut line = format!(
                    "  {}  batch {}  {} rows in, {} out; {} patients out, {} withheld (Type 1); {} rows quarantined",
                    r.practice,
                    r.batch,
                    r.rows_in_total(),
                    r.rows_out_total(),
                    r.patients_out,
                    r.type1_excluded_patients,
                    r.quarantined_total()
                );
                if *deleted_elsewhere > 0 {
                    line.push_str(&format!(
                        "; {deleted_elsewhere} patients deleted from other practices' batches"
                    ));
                }
                println!("{line}");
            }
        }
    }
    print_collect_totals(s);
    let quarantine = opts
        .quarantine
        .clone()
        .unwrap_or_else(|| opts.extract.join("quarantine"));
    println!(
        "  quarantined rows are listed, practice side, in {}/",
        quarantine.display()
    );
}

pub fn print_collect_totals(s: &CollectSummary) {
    let t = gpdp::collect::totals(s);
    let n = |k: &str| t[k].as_u64().unwrap_or(0);
    let listing = |k: &str| {
        t[k].as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| "none".to_string())
    };
    println!(
        "  {} rows in, {} out in {:.2}s ({:.2} M rows/s); {} patients out",
        n("rows_in"),
        n("rows_out"),
        s.seconds,
        t["rows_per_second"].as_f64().unwrap_or(0.0) / 1e6,
        n("patients_out")
    );
    println!(
        "  Type 1 opt-out: {} registrations withheld at source, {} tombstones sent; {} registrations held back for a dissent recorded at another practice",
        n("type1_excluded_patients"),
        n("tombstones_emitted"),
        n("withheld_by_tombstone_patients")
    );
    println!(
        "  quarantined (never left the practice): {}",
        listing("quarantined")
    );
    println!(
        "  excluded codes (never left the practice): {}",
        listing("excluded_codes")
    );
}
