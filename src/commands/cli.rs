//! The command line's grammar (clap derive): every command and its
//! arguments, with the help text `gpdp --help` prints. Each command's
//! arguments are one struct, handed whole to its handler.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use gpdp::synth;

/// GP data for research, safely: de-identification on collection, opt-outs
/// enforced, aggregate-only answers from a Trusted Research Environment —
/// demonstrated and measured on synthetic data.
///
/// Exit status: 0 success, 1 internal error, 2 bad usage or input (nothing
/// changed), 3 refused by policy.
#[derive(Parser)]
#[command(name = "gpdp", version, max_term_width = 100)]
pub struct Cli {
    /// Never draw progress bars (they are drawn only on a terminal anyway).
    #[arg(long, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the whole pipeline on an embedded default population and say where the outputs are.
    Demo(DemoArgs),
    /// Generate synthetic GP extracts with a ground truth (deterministic for a seed).
    Synth(SynthArgs),
    /// Link provider extracts (hospital spells, death registrations) into the
    /// store at their provider: same key and pseudonym domain as collection,
    /// the policy's [linked.*] columns, quarantine, one atomic commit each.
    Link(LinkArgs),
    /// De-identify practice extracts on collection into the store (Type 1 at
    /// source, keyed pseudonyms, generalisation, quarantine, atomic batches).
    Collect(CollectArgs),
    /// Ask the TRE an aggregate question in SQL; get safe, disclosure-controlled answers.
    ///
    /// Views: patients (patient_id, patient_key, practice_id, age_band, sex, ethnicity,
    /// lsoa_code, imd_decile, registered, deceased, birth_month,
    /// registration_start, registration_end, date_of_death), clinical_events
    /// (patient_id, patient_key, date, event_year, snomedct_code, numeric_value)
    /// and medications (patient_id, patient_key, date, event_year, dmd_code, quantity).
    ///
    /// Each project has its rule set: threshold and rounding (opensafely,
    /// acro), the cell key method (ckm: needs --perturbation-key), or
    /// differential privacy (dp: every answer is charged to your privacy
    /// budget on this store, across your projects, and states its noise —
    /// σ and 95% intervals — under the table and in --format json).
    Query(QueryArgs),
    /// Opt-out lists: ingest the National Data Opt-out list (pseudonymised).
    Optout {
        #[command(subcommand)]
        command: OptoutCommand,
    },
    /// Check a store independently (exit 0 only if every check passes, 3 if one fails).
    Audit(AuditArgs),
    /// Benchmark collection (with its plain CSV→Parquet peer) and TRE queries on this machine.
    Bench(BenchArgs),
    /// Serve the TRE boundary over Arrow Flight SQL (ADBC, JDBC clients).
    Serve(ServeArgs),
    /// Write the evidence as report.html (charts, offline) and report.json.
    Report(ReportArgs),
    /// Write the public data-uses register: projects, what they asked and
    /// what was released, opt-out figures, the audit log's head, and a
    /// plain-English section for patients (no pseudonym, key or NHS number).
    Register(RegisterArgs),
    /// Make a new 32-byte key: a collection key (practice side) or a TRE
    /// perturbation key (file mode 0600; never overwrites).
    Keygen(KeygenArgs),
    /// Change the perturbation key a store's cell-key answers are drawn with.
    ///
    /// The first query under the cell key method binds the store to the
    /// TRE's perturbation key (its id, in the audit log); any other key is
    /// then refused (perturbation_key_changed), because fresh noise on the
    /// same cells could be averaged away. Rotating is deliberate: the
    /// holder of the bound key names the new one and why, in the log.
    RotatePerturbationKey(RotatePerturbationKeyArgs),
}

#[derive(Subcommand)]
pub enum OptoutCommand {
    /// A patient's own answer, at the practice (needs the collection key):
    /// are their records in the store, does a Type 1 opt-out or the
    /// National Data Opt-out apply, and which projects' views can include them.
    Status(OptoutStatusArgs),
    /// Pseudonymise the National Data Opt-out list with the collection key and
    /// store it (only pseudonyms are stored); replaces the previous list.
    Ingest(OptoutIngestArgs),
    /// Delete patients who registered a Type 1 opt-out after collection from
    /// every table of every practice's batch, with proof in the audit log:
    /// unreachable at once (deletion vectors), erased by `optout purge`.
    Apply(OptoutApplyArgs),
    /// Erase the rows later opt-outs made unreachable: rewrite the files
    /// that carry deletion vectors without them, with proof in the audit log.
    Purge(OptoutPurgeArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Args)]
pub struct DemoArgs {
    /// Where to put the demo's outputs (replaced if it holds a previous demo).
    #[arg(long, default_value = "gpdp-demo")]
    pub out: PathBuf,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Args)]
pub struct SynthArgs {
    /// New (or empty) directory to write the extracts into.
    #[arg(long)]
    pub out: PathBuf,
    /// Number of GP practices.
    #[arg(long, default_value_t = 10)]
    pub practices: u32,
    /// Number of distinct patients (persons) across all practices.
    #[arg(long, default_value_t = 10_000)]
    pub patients: u64,
    /// Random seed; the same seed gives byte-identical output.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// First year of the record window (events are generated from 1 January).
    #[arg(long, default_value_t = synth::DEFAULT_START_YEAR)]
    pub start_year: i32,
    /// The date the practices' extracts are taken (YYYY-MM-DD).
    #[arg(long, default_value = synth::DEFAULT_EXTRACT_DATE)]
    pub extract_date: chrono::NaiveDate,
    /// Collection policy naming the Type 1 codes (default: the built-in policies/collection.toml).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Args)]
pub struct LinkArgs {
    /// The extract directory (with linked/apcs.csv, linked/ons_deaths.csv).
    #[arg(long)]
    pub extract: PathBuf,
    #[arg(long)]
    pub store: PathBuf,
    /// The collection key (the same one the GP extracts were collected with).
    #[arg(long)]
    pub key: PathBuf,
    /// Link only this source: apcs or ons_deaths (repeatable; default: every one present).
    #[arg(long = "source", value_parser = gpdp::link::parse_source)]
    pub sources: Vec<gpdp::extract::Source>,
    /// Collection policy (default: the built-in policies/collection.toml).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Print the receipts as JSON.
    #[arg(long)]
    pub json: bool,
    /// Take an input the shrink guards would hold (it lost more than the
    /// policy's max_shrink, or is mostly quarantined, or was cut mid-line);
    /// the audit log records that, with the counts.
    #[arg(long)]
    pub accept_shrink: bool,
}

#[derive(Args)]
pub struct CollectArgs {
    /// The extract directory (with practices/<ODS>/ and reference/).
    #[arg(long)]
    pub extract: PathBuf,
    /// The store directory (created if absent).
    #[arg(long)]
    pub store: PathBuf,
    /// The collection key file (make one with `gpdp keygen`).
    #[arg(long)]
    pub key: PathBuf,
    /// Collection policy (default: the built-in policies/collection.toml).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Collect only this practice (repeatable; default: all).
    #[arg(long = "practice", value_name = "ODS")]
    pub practices: Vec<String>,
    /// Where to list quarantined rows, practice side (default: EXTRACT/quarantine).
    #[arg(long)]
    pub quarantine: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the totals and every receipt as JSON.
    #[arg(long)]
    pub json: bool,
    /// Take an input the shrink guards would hold (it lost more than the
    /// policy's max_shrink, or is mostly quarantined, or was cut mid-line);
    /// the audit log records that, with the counts.
    #[arg(long)]
    pub accept_shrink: bool,
}

/// What the TRE side holds beside the store, for `query` and `serve`.
#[derive(Args)]
pub struct TreArgs {
    /// The TRE policy (default: the built-in policies/tre.toml).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// The TRE's perturbation key for projects under the cell key method
    /// (`gpdp keygen`; never the collection key).
    #[arg(long, env = "GPDP_PERTURBATION_KEY", value_name = "KEYFILE")]
    pub perturbation_key: Option<PathBuf>,
    /// Where the privacy ledgers live, one per population (the collection
    /// key's id): every store of the same patients shares one spend
    /// (default: ledgers/ beside the store).
    #[arg(long, env = "GPDP_LEDGER", value_name = "DIR")]
    pub ledger: Option<PathBuf>,
}

#[derive(Args)]
pub struct QueryArgs {
    /// The store directory.
    #[arg(long)]
    pub store: PathBuf,
    /// The project the question is asked for.
    #[arg(long)]
    pub project: String,
    /// The researcher.
    #[arg(long)]
    pub user: String,
    /// The researcher's token (or set GPDP_TOKEN).
    #[arg(long, env = "GPDP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub tre: TreArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// The SQL query.
    #[arg(required_unless_present = "sql_file", conflicts_with = "sql_file")]
    pub sql: Option<String>,
    /// Read the SQL from FILE instead (`-`: standard input) — for long
    /// codelists: a shell passes at most 128 KiB in one argument.
    #[arg(long, value_name = "FILE")]
    pub sql_file: Option<PathBuf>,
}

#[derive(Args)]
pub struct AuditArgs {
    #[arg(long)]
    pub store: PathBuf,
    /// The generator's truth directory (DIR/truth): adds the checks against it.
    #[arg(long, requires = "key")]
    pub truth: Option<PathBuf>,
    /// The collection key, to pseudonymise the truth's NHS numbers.
    #[arg(long, requires = "truth")]
    pub key: Option<PathBuf>,
    /// Only verify the hash chain of the audit log against the manifest
    /// (with `no_rollback`, and `--expect-head` if given).
    #[arg(long, conflicts_with = "truth")]
    pub verify_log: bool,
    /// Print the log's head — `seq=N hash=H generation=G time=T` — for
    /// the operator to publish outside the TRE (after checking the chain
    /// and `no_rollback`).
    #[arg(long, conflicts_with_all = ["truth", "verify_log"])]
    pub head: bool,
    /// A head published earlier (as `--head` printed it): fail
    /// (`log_extends_head`) unless the log still extends it, which
    /// catches a log and store rolled back together.
    #[arg(long, value_name = "HEAD")]
    pub expect_head: Option<gpdp::store::log::Head>,
    /// Collection policy whose `[erasure] purge_deadline_days` bounds
    /// `tombstoned_patients_absent` (default: the built-in
    /// policies/collection.toml, 30 days).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Patients at scale 1.
    #[arg(long, default_value_t = 200_000)]
    pub patients: u64,
    /// Practices at scale 1.
    #[arg(long, default_value_t = 20)]
    pub practices: u32,
    /// Scales to run, e.g. 1,2,4 (patients and practices both grow).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub scale: Vec<u32>,
    /// Worker thread counts, e.g. 1,2: the largest runs every scale, the
    /// others the first scale once more, to show scaling across cores
    /// (default: 1 and every core).
    #[arg(long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// TRE runs per query on the last scale (0 skips the TRE).
    #[arg(long, default_value_t = 5)]
    pub tre_runs: usize,
    /// Targets of the privacy measurement: the padding attack against
    /// the truth on a small store of its own, under the cell key method
    /// and under differential privacy by budget (0 skips it).
    #[arg(long, default_value_t = 60)]
    pub privacy_targets: usize,
    /// Only the privacy measurement (the padding attack by budget and
    /// the reconstruction curve); with --out, writes privacy.json for
    /// `gpdp report --privacy`.
    #[arg(long, conflicts_with = "scale")]
    pub privacy_only: bool,
    /// Counts the reconstruction attack asks at most, decoded along the
    /// way (0 skips it).
    #[arg(long, default_value_t = 100)]
    pub reconstruction_counts: usize,
    /// Reconstruction attacks per rule set, each over other random
    /// subsets of the group; the curve is their mean accuracy.
    #[arg(long, default_value_t = 5)]
    pub reconstruction_runs: usize,
    /// Where generated populations are cached and scratch stores live.
    #[arg(long, default_value = "bench-data")]
    pub data: PathBuf,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write bench.json and bench.html (charts of the scaling curve) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long)]
    pub store: PathBuf,
    #[command(flatten)]
    pub tre: TreArgs,
    /// Address to listen on: loopback only unless --allow-remote.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: std::net::SocketAddr,
    /// Listen on a non-loopback address (needs --tls-cert and --tls-key:
    /// tokens must not cross a network in clear text).
    #[arg(long)]
    pub allow_remote: bool,
    /// TLS certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

#[derive(Args)]
pub struct ReportArgs {
    #[arg(long)]
    pub store: PathBuf,
    /// The generator's truth directory (DIR/truth): compare with the full population.
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// The collection key: with --truth, the report includes the full audit.
    #[arg(long, requires = "truth")]
    pub key: Option<PathBuf>,
    /// Where to write report.html and report.json.
    #[arg(long, default_value = "gpdp-report")]
    pub out: PathBuf,
    /// The attacks' measurement to show (`privacy.json` from `gpdp bench
    /// --privacy-only --out DIR`; default: the one shipped with gpdp).
    #[arg(long)]
    pub privacy: Option<PathBuf>,
}

#[derive(Args)]
pub struct RegisterArgs {
    #[arg(long)]
    pub store: PathBuf,
    /// The TRE policy whose projects to list (default: the built-in policies/tre.toml).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Where to write register.html and register.json.
    #[arg(long, default_value = "gpdp-register")]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct KeygenArgs {
    /// Path of the key file to create.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct RotatePerturbationKeyArgs {
    #[arg(long)]
    pub store: PathBuf,
    /// The key the store is bound to now.
    #[arg(long)]
    pub from: PathBuf,
    /// The new key (make it with `gpdp keygen`).
    #[arg(long)]
    pub to: PathBuf,
    /// Why the key changes (published in the audit log).
    #[arg(long)]
    pub reason: String,
}

#[derive(Args)]
pub struct OptoutStatusArgs {
    #[arg(long)]
    pub nhs_number: String,
    #[arg(long)]
    pub store: PathBuf,
    #[arg(long)]
    pub key: PathBuf,
    /// The TRE policy whose projects to check (default: the built-in policies/tre.toml).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct OptoutIngestArgs {
    /// The NDOO list: a CSV with one column, nhs_number.
    #[arg(long)]
    pub ndoo: PathBuf,
    #[arg(long)]
    pub store: PathBuf,
    #[arg(long)]
    pub key: PathBuf,
    /// Ingest the valid numbers even if some are invalid (they are reported).
    #[arg(long)]
    pub skip_invalid: bool,
    /// Ingest a list that is empty or lost more than the collection
    /// policy's max_shrink of the patients in force (logged with the counts).
    #[arg(long)]
    pub accept_shrink: bool,
}

#[derive(Args)]
pub struct OptoutApplyArgs {
    /// The requests: a CSV with header `nhs_number` or
    /// `nhs_number,requested_at` (YYYY-MM-DD or RFC 3339; default: now).
    #[arg(long = "type1")]
    pub type1: PathBuf,
    #[arg(long)]
    pub store: PathBuf,
    #[arg(long)]
    pub key: PathBuf,
    /// Apply the valid lines even if some are invalid (they stay pending).
    #[arg(long)]
    pub skip_invalid: bool,
    /// Then purge (as `gpdp optout purge`): the rows are erased from the
    /// bytes too, in a second commit.
    #[arg(long)]
    pub purge: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct OptoutPurgeArgs {
    #[arg(long)]
    pub store: PathBuf,
    /// Rewrite only the files whose deleted share (rows masked / rows) is
    /// at least this (0.0: every file with a deletion vector).
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub min_deleted_share: f64,
    /// Parquet codec of the rewritten files: zstd(N), lz4, snappy or none
    /// (default: the built-in collection policy's).
    #[arg(long, value_parser = codec)]
    pub codec: Option<gpdp::policy::Codec>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s} is not a share between 0 and 1")),
    }
}

fn codec(s: &str) -> Result<gpdp::policy::Codec, String> {
    gpdp::policy::Codec::parse(s).ok_or_else(|| {
        format!("{s} is not a codec: zstd, zstd(N) with N from 1 to 22, lz4, snappy or none")
    })
}
