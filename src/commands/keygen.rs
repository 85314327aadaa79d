//! `gpdp keygen`: a new key — a collection key or the TRE's perturbation
//! key (the same kind of secret; the role is where it is used) — and where
//! each must stay.

use anyhow::Context;

use super::cli::KeygenArgs;

pub fn run(args: KeygenArgs) -> anyhow::Result<()> {
    let KeygenArgs { out } = args;
    gpdp::deid::key::generate(&out).with_context(|| "gpdp keygen".to_string())?;
    println!("wrote a new 32-byte key to {} (mode 0600)", out.display());
    println!(
        "as a collection key, keep it on the practice side: never copy it into the store or the TRE;"
    );
    println!("as a perturbation key, keep it on the TRE side: it never leaves the TRE");
    Ok(())
}
