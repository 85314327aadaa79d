//! `gpdp rotate-perturbation-key`: a store's cell-key answers moved to a
//! new perturbation key, deliberately and on the record.

use std::path::Path;

use super::cli::RotatePerturbationKeyArgs;

pub fn run(args: RotatePerturbationKeyArgs) -> anyhow::Result<()> {
    let RotatePerturbationKeyArgs {
        store,
        from,
        to,
        reason,
    } = args;
    if reason.trim().is_empty() {
        return Err(gpdp::error::BadInput(
            "--reason must say why the key changes: it is published in the audit log".into(),
        )
        .into());
    }
    let manifest = gpdp::store::read_manifest(&store)?;
    let collection = manifest.key_id.as_deref().unwrap_or("");
    let load = |path: &Path| {
        gpdp::tre::aggregates::record_keys::RecordKeys::load(path, collection)
            .map_err(|e| gpdp::error::BadInput(e.to_string()))
    };
    let (old, new) = (load(&from)?, load(&to)?);
    gpdp::tre::control::ckm::rotate(&store, &old, &new, &reason)?;
    println!(
        "{}: cell-key answers are now drawn with perturbation key {} (was {}); recorded in the audit log",
        store.display(),
        new.id(),
        old.id()
    );
    Ok(())
}
