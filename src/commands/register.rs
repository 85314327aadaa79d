//! `gpdp register`: the public data-uses register written as
//! register.html and register.json, with the log head to publish.

use super::cli::RegisterArgs;

pub fn run(args: RegisterArgs) -> anyhow::Result<()> {
    let RegisterArgs { store, policy, out } = args;
    let policy = gpdp::policy::tre::TrePolicy::load(policy.as_deref())?;
    let r = gpdp::register::build(&store, &policy)?;
    let (json, html) = gpdp::register::html::write(&r, &out)?;
    println!(
        "wrote {} and {}: {} projects, {} released questions; publish the log head with it:\n{}",
        html.display(),
        json.display(),
        r.projects.len(),
        r.released_queries.len(),
        r.log_head
    );
    Ok(())
}
