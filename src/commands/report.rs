//! `gpdp report`: the evidence written as report.html and report.json.

use super::cli::ReportArgs;

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let ReportArgs {
        store,
        truth,
        key,
        out,
        privacy,
    } = args;
    let input = truth.as_deref().map(|dir| gpdp::report::TruthInput {
        dir,
        key: key.as_deref(),
    });
    let r = gpdp::report::build(&store, input, privacy.as_deref())?;
    let (json, html) = gpdp::report::html::write(&r, &out)?;
    println!(
        "wrote {} and {} ({:.2} s); audit: {}",
        html.display(),
        json.display(),
        r.seconds,
        if r.optouts.audit.passed {
            "every check passed"
        } else {
            "FAILED"
        }
    );
    Ok(())
}
