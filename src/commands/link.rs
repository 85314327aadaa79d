//! `gpdp link`: provider extracts linked into the store, one receipt per
//! source printed (or all as JSON); a held source ends the command with the
//! shrink guard's refusal.

use gpdp::policy::CollectionPolicy;

use super::cli::LinkArgs;

pub fn run(args: LinkArgs) -> anyhow::Result<()> {
    let LinkArgs {
        extract,
        store,
        key,
        sources,
        policy,
        json,
        accept_shrink,
    } = args;
    let receipts = gpdp::link::link(&gpdp::link::LinkOptions {
        extract,
        store,
        key,
        policy: CollectionPolicy::load(policy.as_deref())?,
        sources,
        quarantine: None,
        accept_shrink,
    })?;
    let held: Vec<_> = receipts
        .iter()
        .filter_map(|r| r.held.clone().map(|h| (r.source.clone(), h)))
        .collect();
    let result = if held.is_empty() {
        Ok(())
    } else {
        Err(gpdp::store::guard::HeldInputs(held).into())
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&receipts)?);
        return result;
    }
    for r in &receipts {
        if let Some(h) = &r.held {
            println!(
                "{}: HELD by rule {}: {}; the source in force stays",
                r.source, h.rule, h.detail
            );
            continue;
        }
        if !r.changed {
            println!(
                "{}: unchanged (batch {} is already in the store)",
                r.source, r.batch
            );
            continue;
        }
        let quarantined: Vec<String> = r
            .quarantined
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!(
            "{}: {} rows in, {} stored ({} patients), {} quarantined ({}); dropped {}; {:.0} rows/s; store generation {}",
            r.source,
            r.rows_in,
            r.rows_out,
            r.patients_out,
            r.quarantined.values().sum::<u64>(),
            if quarantined.is_empty() {
                "none".into()
            } else {
                quarantined.join(", ")
            },
            if r.dropped_columns.is_empty() {
                "nothing".into()
            } else {
                r.dropped_columns.join(", ")
            },
            r.rows_per_second,
            r.generation
        );
    }
    result
}
