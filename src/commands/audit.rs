//! `gpdp audit`: the independent checks of a store (or only its log's
//! chain and head), printed as a table or JSON; a failed check is exit 3.

use super::cli::AuditArgs;

pub fn run(args: AuditArgs) -> anyhow::Result<()> {
    let AuditArgs {
        store,
        truth,
        key,
        verify_log,
        head,
        expect_head,
        policy,
        json,
    } = args;
    if verify_log || head {
        let r = gpdp::audit::verify_log(&store, expect_head.as_ref())?;
        if head && json {
            println!("{}", serde_json::to_string_pretty(&r.published_head)?);
        } else if head {
            println!("{}", r.published_head);
        } else if json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            println!(
                "audit log intact: {} lines, every store generation up to {} recorded, {} queries ({} refused)\nno_rollback: {}{}\nhead: {}",
                r.lines,
                r.generation,
                r.queries,
                r.refused,
                r.rollback,
                if expect_head.is_some() {
                    "\nlog_extends_head: the log extends the published head"
                } else {
                    ""
                },
                r.published_head
            );
        }
        return Ok(());
    }
    let truth = match (&truth, &key) {
        (Some(dir), Some(key)) => Some(gpdp::audit::Truth { dir, key }),
        _ => None,
    };
    let erasure = gpdp::policy::CollectionPolicy::load(policy.as_deref())?.erasure;
    let r = gpdp::audit::audit_with(&store, truth, expect_head.as_ref(), erasure)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", r.to_table());
    }
    r.verdict()?;
    Ok(())
}
