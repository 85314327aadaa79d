//! `gpdp demo`: every stage of the pipeline on an embedded default, in one
//! command with no arguments: synthetic extracts, then collection into a
//! store (stages are added here as they land), and it says where everything is.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::collect::{self, CollectOptions, CollectSummary};
use crate::error::BadInput;
use crate::policy::CollectionPolicy;
use crate::progress::Progress;
use crate::synth::{self, SynthOptions};

/// The demo population: small enough to run in seconds, large enough that
/// every opt-out pattern and bad-row kind occurs.
pub const DEMO_PRACTICES: u32 = 8;
pub const DEMO_PATIENTS: u64 = 20_000;
pub const DEMO_SEED: u64 = 42;

/// A marker that says a directory was made by `gpdp demo` and may be replaced.
const MARKER: &str = ".gpdp-demo";

pub struct DemoOutcome {
    pub dir: PathBuf,
    pub extracts: PathBuf,
    pub key: PathBuf,
    pub store: PathBuf,
    pub report: synth::SynthReport,
    pub collection: CollectSummary,
}

pub fn run(dir: &Path, threads: usize, progress: &Progress) -> anyhow::Result<DemoOutcome> {
    if dir.exists() {
        if !dir.join(MARKER).exists()
            && std::fs::read_dir(dir)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            return Err(BadInput(format!(
                "{} exists and was not made by gpdp demo; pass --out with a new directory",
                dir.display()
            ))
            .into());
        }
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("removing the previous demo in {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join(MARKER), "made by gpdp demo; safe to delete\n")
        .with_context(|| format!("writing into {}", dir.display()))?;

    let extracts = dir.join("extracts");
    progress.stage("1/2 generating synthetic GP extracts");
    let report = synth::run(
        &SynthOptions {
            out: extracts.clone(),
            practices: DEMO_PRACTICES,
            patients: DEMO_PATIENTS,
            seed: DEMO_SEED,
            start_year: synth::DEFAULT_START_YEAR,
            extract_date: synth::DEFAULT_EXTRACT_DATE.parse()?,
            threads,
            policy: CollectionPolicy::load(None)?,
        },
        progress,
    )?;

    progress.stage("2/2 collecting: de-identification on collection into the store");
    let key = dir.join("collection.key");
    crate::deid::key::generate(&key)?;
    let store = dir.join("store");
    let collection = collect::run(
        &CollectOptions {
            extract: extracts.clone(),
            store: store.clone(),
            key: key.clone(),
            policy: CollectionPolicy::load(None)?,
            practices: Vec::new(),
            threads,
            quarantine: None,
        },
        progress,
    )?;
    Ok(DemoOutcome {
        dir: dir.to_owned(),
        extracts,
        key,
        store,
        report,
        collection,
    })
}
