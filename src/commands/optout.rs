//! `gpdp optout ingest|apply|purge|status`: the National Data Opt-out list,
//! Type 1 opt-outs registered after collection (unreachable at once,
//! erased by the purge), and a patient's own answer.

use gpdp::policy::CollectionPolicy;

use super::cli::{OptoutApplyArgs, OptoutIngestArgs, OptoutPurgeArgs, OptoutStatusArgs};

pub fn ingest(args: OptoutIngestArgs) -> anyhow::Result<()> {
    let OptoutIngestArgs {
        ndoo,
        store,
        key,
        skip_invalid,
        accept_shrink,
    } = args;
    let policy = CollectionPolicy::load(None)?;
    let r =
        gpdp::optout::ingest::ingest(&ndoo, &store, &key, skip_invalid, accept_shrink, &policy)?;
    if r.unchanged {
        println!(
            "National Data Opt-out list unchanged: {} patients (store generation {})",
            r.patients, r.generation
        );
    } else {
        println!(
            "ingested the National Data Opt-out list: {} patients ({} lines, {} invalid skipped); store generation {}",
            r.patients, r.listed, r.invalid, r.generation
        );
    }
    Ok(())
}

pub fn apply(args: OptoutApplyArgs) -> anyhow::Result<()> {
    let OptoutApplyArgs {
        type1,
        store,
        key,
        skip_invalid,
        purge,
        json,
    } = args;
    let codec = CollectionPolicy::load(None)?.codec;
    let r = gpdp::optout::apply::apply(&type1, &store, &key, skip_invalid, codec, purge)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let rows: u64 = r.rows_removed.values().sum();
    if r.unchanged {
        println!(
            "Type 1 requests already applied: {} patients, nothing to delete (store generation {})",
            r.patients,
            r.generation - u64::from(r.purge.as_ref().is_some_and(|p| !p.unchanged))
        );
    } else {
        println!(
            "applied {} Type 1 opt-outs ({} already applied): {} rows of {} registrations made unreachable in {} practice batches ({} deletion vectors written, no data file rewritten); store generation {}",
            r.applied,
            r.already_applied,
            rows,
            r.registrations_deleted,
            r.batches_masked,
            r.files_masked,
            r.generation - u64::from(r.purge.as_ref().is_some_and(|p| !p.unchanged))
        );
        for (table, n) in &r.rows_removed {
            println!("  {table}: {n} rows unreachable");
        }
    }
    if let (Some(median), Some(max)) = (r.latency_median_seconds, r.latency_max_seconds) {
        println!(
            "request to unreachable: median {}, longest {}",
            human_duration(median),
            human_duration(max)
        );
    }
    if let Some(p) = &r.purge {
        print_purge(p);
    }
    println!(
        "backlog: {} requests processed, {} pending{}; took {:.2} s",
        r.requests - r.pending,
        r.pending,
        if r.pending > 0 {
            " (invalid lines: correct them and run again)"
        } else {
            ""
        },
        r.seconds
    );
    Ok(())
}

pub fn purge(args: OptoutPurgeArgs) -> anyhow::Result<()> {
    let OptoutPurgeArgs {
        store,
        min_deleted_share,
        codec,
        json,
    } = args;
    let codec = match codec {
        Some(c) => c,
        None => CollectionPolicy::load(None)?.codec,
    };
    let r = gpdp::optout::purge::purge(&store, min_deleted_share, codec)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    print_purge(&r);
    println!("took {:.2} s", r.seconds);
    Ok(())
}

fn print_purge(r: &gpdp::optout::purge::PurgeReport) {
    let kept = if r.vectors_kept > 0 {
        format!(
            "; {} deletion vectors kept (deleted share below {})",
            r.vectors_kept, r.min_deleted_share
        )
    } else {
        String::new()
    };
    if r.unchanged {
        println!(
            "purge: nothing to erase{kept} (store generation {})",
            r.generation
        );
        return;
    }
    println!(
        "purged: {} rows erased from {} files in {} practice batches; {} patients' rows all erased{kept}; store generation {}",
        r.rows_erased.values().sum::<u64>(),
        r.files_rewritten,
        r.batches_rewritten,
        r.patients_erased,
        r.generation
    );
    for (table, n) in &r.rows_erased {
        println!("  {table}: {n} rows erased");
    }
    if let (Some(median), Some(max)) = (
        r.latency_erased_median_seconds,
        r.latency_erased_max_seconds,
    ) {
        println!(
            "request to erased: median {}, longest {}",
            human_duration(median),
            human_duration(max)
        );
    }
}

pub fn status(args: OptoutStatusArgs) -> anyhow::Result<()> {
    let OptoutStatusArgs {
        nhs_number,
        store,
        key,
        policy,
        json,
    } = args;
    let policy = gpdp::policy::tre::TrePolicy::load(policy.as_deref())?;
    let s = gpdp::optout::status::status(&nhs_number, &store, &key, &policy)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", s.to_text());
    }
    Ok(())
}

/// Seconds as the largest sensible unit.
fn human_duration(seconds: f64) -> String {
    match seconds {
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7200.0 => format!("{:.1} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} days", s / 86_400.0),
    }
}
