//! `gpdp keygen`: a new collection key, and where it must stay.

use anyhow::Context;

use super::cli::KeygenArgs;

pub fn run(args: KeygenArgs) -> anyhow::Result<()> {
    let KeygenArgs { out } = args;
    gpdp::deid::key::generate(&out).with_context(|| "gpdp keygen".to_string())?;
    println!(
        "wrote a new 32-byte collection key to {} (mode 0600)",
        out.display()
    );
    println!("keep it on the practice side: it must never be copied into the store or the TRE");
    Ok(())
}
