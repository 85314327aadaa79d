//! `gpdp serve`: the store verified against its manifest before anyone can
//! ask, then the TRE served over Arrow Flight SQL until Ctrl-C or SIGTERM.

use super::cli::ServeArgs;
use super::tre_boundary;

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs {
        store,
        tre,
        listen,
        allow_remote,
        tls_cert,
        tls_key,
    } = args;
    let tls = match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => Some(gpdp::serve::Tls { cert, key }),
        _ => None,
    };
    let listen = gpdp::serve::Listen::new(listen, allow_remote, tls)?;
    let scheme = listen.scheme();
    let boundary = tre_boundary(tre, &store)?;
    // Every file the manifest records, before anyone can ask: the
    // operator is told which file is wrong (researchers never are).
    let manifest = gpdp::store::read_manifest(&store)?;
    let bad = gpdp::store::verify::files(&store, &manifest.all_files().collect::<Vec<_>>());
    if !bad.is_empty() {
        let files: Vec<String> = bad.iter().map(ToString::to_string).collect();
        return Err(gpdp::tre::TreError::Refused(gpdp::tre::Refusal::new(
            "store_corrupt",
            format!(
                "{} does not match its manifest: {}; not serving it. Run `gpdp audit --store {}`",
                store.display(),
                files.join(", "),
                store.display()
            ),
        ))
        .into());
    }
    let rt = gpdp::tre::runtime(None)?;
    rt.block_on(gpdp::serve::serve(
        store.clone(),
        boundary,
        listen,
        |addr| {
            println!(
                "gpdp serve: the TRE of {} over Arrow Flight SQL at {scheme}://{addr} (Ctrl-C to stop)",
                store.display()
            );
        },
        gpdp::serve::shutdown_signal(),
    ))?;
    println!("gpdp serve: stopped; in-flight queries finished and were audited");
    Ok(())
}
