//! The `gpdp` command line: parse arguments, call one handler per command,
//! map errors to the exit statuses of the interface contract.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether whoever reads our standard output has gone (`gpdp … | head`).
/// From then on output is dropped, and the command ends with the status
/// of its work, as ripgrep does: a collection that committed its batches
/// has succeeded even if nobody read the summary.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes to standard output; a closed pipe is noted, never a panic (the
/// standard `print!` panics on it).
fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = std::io::stdout().lock().write_fmt(args)
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
    }
}

// Every `print!`/`println!` below goes through `write_stdout`.
macro_rules! print {
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*)) };
}
macro_rules! println {
    () => { write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

use anyhow::Context;
use clap::{Parser, Subcommand};
use gpdp::error::{ExitStatus, exit_status_of};
use gpdp::policy::CollectionPolicy;
use gpdp::progress::Progress;
use gpdp::synth::{self, SynthOptions, SynthReport};

/// GP data for research, safely: de-identification on collection, opt-outs
/// enforced, aggregate-only answers from a Trusted Research Environment —
/// demonstrated and measured on synthetic data.
///
/// Exit status: 0 success, 1 internal error, 2 bad usage or input (nothing
/// changed), 3 refused by policy.
#[derive(Parser)]
#[command(name = "gpdp", version, max_term_width = 100)]
struct Cli {
    /// Never draw progress bars (they are drawn only on a terminal anyway).
    #[arg(long, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline on an embedded default population and say where the outputs are.
    Demo {
        /// Where to put the demo's outputs (replaced if it holds a previous demo).
        #[arg(long, default_value = "gpdp-demo")]
        out: PathBuf,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Generate synthetic GP extracts with a ground truth (deterministic for a seed).
    Synth {
        /// New (or empty) directory to write the extracts into.
        #[arg(long)]
        out: PathBuf,
        /// Number of GP practices.
        #[arg(long, default_value_t = 10)]
        practices: u32,
        /// Number of distinct patients (persons) across all practices.
        #[arg(long, default_value_t = 10_000)]
        patients: u64,
        /// Random seed; the same seed gives byte-identical output.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// First year of the record window (events are generated from 1 January).
        #[arg(long, default_value_t = synth::DEFAULT_START_YEAR)]
        start_year: i32,
        /// The date the practices' extracts are taken (YYYY-MM-DD).
        #[arg(long, default_value = synth::DEFAULT_EXTRACT_DATE)]
        extract_date: chrono::NaiveDate,
        /// Collection policy naming the Type 1 codes (default: the built-in policies/collection.toml).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Link provider extracts (hospital spells, death registrations) into the
    /// store at their provider: same key and pseudonym domain as collection,
    /// the policy's [linked.*] columns, quarantine, one atomic commit each.
    Link {
        /// The extract directory (with linked/apcs.csv, linked/ons_deaths.csv).
        #[arg(long)]
        extract: PathBuf,
        #[arg(long)]
        store: PathBuf,
        /// The collection key (the same one the GP extracts were collected with).
        #[arg(long)]
        key: PathBuf,
        /// Link only this source: apcs or ons_deaths (repeatable; default: every one present).
        #[arg(long = "source", value_parser = gpdp::link::parse_source)]
        sources: Vec<gpdp::extract::Source>,
        /// Collection policy (default: the built-in policies/collection.toml).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Print the receipts as JSON.
        #[arg(long)]
        json: bool,
        /// Take an input the shrink guards would hold (it lost more than the
        /// policy's max_shrink, or is mostly quarantined, or was cut mid-line);
        /// the audit log records that, with the counts.
        #[arg(long)]
        accept_shrink: bool,
    },
    /// De-identify practice extracts on collection into the store (Type 1 at
    /// source, keyed pseudonyms, generalisation, quarantine, atomic batches).
    Collect {
        /// The extract directory (with practices/<ODS>/ and reference/).
        #[arg(long)]
        extract: PathBuf,
        /// The store directory (created if absent).
        #[arg(long)]
        store: PathBuf,
        /// The collection key file (make one with `gpdp keygen`).
        #[arg(long)]
        key: PathBuf,
        /// Collection policy (default: the built-in policies/collection.toml).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Collect only this practice (repeatable; default: all).
        #[arg(long = "practice", value_name = "ODS")]
        practices: Vec<String>,
        /// Where to list quarantined rows, practice side (default: EXTRACT/quarantine).
        #[arg(long)]
        quarantine: Option<PathBuf>,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Print the totals and every receipt as JSON.
        #[arg(long)]
        json: bool,
        /// Take an input the shrink guards would hold (it lost more than the
        /// policy's max_shrink, or is mostly quarantined, or was cut mid-line);
        /// the audit log records that, with the counts.
        #[arg(long)]
        accept_shrink: bool,
    },
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
    Query {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// The project the question is asked for.
        #[arg(long)]
        project: String,
        /// The researcher.
        #[arg(long)]
        user: String,
        /// The researcher's token (or set GPDP_TOKEN).
        #[arg(long, env = "GPDP_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// TRE policy (default: the built-in policies/tre.toml).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// The TRE's perturbation key for projects under the cell key method
        /// (`gpdp keygen`; never the collection key).
        #[arg(long, env = "GPDP_PERTURBATION_KEY", value_name = "KEYFILE")]
        perturbation_key: Option<PathBuf>,
        /// Where the privacy ledgers live, one per population (the collection
        /// key's id): every store of the same patients shares one spend
        /// (default: ledgers/ beside the store).
        #[arg(long, env = "GPDP_LEDGER", value_name = "DIR")]
        ledger: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// The SQL query.
        #[arg(required_unless_present = "sql_file", conflicts_with = "sql_file")]
        sql: Option<String>,
        /// Read the SQL from FILE instead (`-`: standard input) — for long
        /// codelists: a shell passes at most 128 KiB in one argument.
        #[arg(long, value_name = "FILE")]
        sql_file: Option<PathBuf>,
    },
    /// Opt-out lists: ingest the National Data Opt-out list (pseudonymised).
    Optout {
        #[command(subcommand)]
        command: OptoutCommand,
    },
    /// Check a store independently (exit 0 only if every check passes, 3 if one fails).
    Audit {
        #[arg(long)]
        store: PathBuf,
        /// The generator's truth directory (DIR/truth): adds the checks against it.
        #[arg(long, requires = "key")]
        truth: Option<PathBuf>,
        /// The collection key, to pseudonymise the truth's NHS numbers.
        #[arg(long, requires = "truth")]
        key: Option<PathBuf>,
        /// Only verify the hash chain of the audit log against the manifest
        /// (with `no_rollback`, and `--expect-head` if given).
        #[arg(long, conflicts_with = "truth")]
        verify_log: bool,
        /// Print the log's head — `seq=N hash=H generation=G time=T` — for
        /// the operator to publish outside the TRE (after checking the chain
        /// and `no_rollback`).
        #[arg(long, conflicts_with_all = ["truth", "verify_log"])]
        head: bool,
        /// A head published earlier (as `--head` printed it): fail
        /// (`log_extends_head`) unless the log still extends it, which
        /// catches a log and store rolled back together.
        #[arg(long, value_name = "HEAD")]
        expect_head: Option<gpdp::store::audit::Head>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Benchmark collection (with its plain CSV→Parquet peer) and TRE queries on this machine.
    Bench {
        /// Patients at scale 1.
        #[arg(long, default_value_t = 200_000)]
        patients: u64,
        /// Practices at scale 1.
        #[arg(long, default_value_t = 20)]
        practices: u32,
        /// Scales to run, e.g. 1,2,4 (patients and practices both grow).
        #[arg(long, value_delimiter = ',', default_value = "1")]
        scale: Vec<u32>,
        /// Worker thread counts, e.g. 1,2: the largest runs every scale, the
        /// others the first scale once more, to show scaling across cores
        /// (default: 1 and every core).
        #[arg(long, value_delimiter = ',')]
        threads: Vec<usize>,
        /// TRE runs per query on the last scale (0 skips the TRE).
        #[arg(long, default_value_t = 5)]
        tre_runs: usize,
        /// Targets of the privacy measurement: the padding attack against
        /// the truth on a small store of its own, under the cell key method
        /// and under differential privacy by budget (0 skips it).
        #[arg(long, default_value_t = 60)]
        privacy_targets: usize,
        /// Only the privacy measurement (the padding attack by budget and
        /// the reconstruction curve); with --out, writes privacy.json for
        /// `gpdp report --privacy`.
        #[arg(long, conflicts_with = "scale")]
        privacy_only: bool,
        /// Counts the reconstruction attack asks at most, decoded along the
        /// way (0 skips it).
        #[arg(long, default_value_t = 100)]
        reconstruction_counts: usize,
        /// Reconstruction attacks per rule set, each over other random
        /// subsets of the group; the curve is their mean accuracy.
        #[arg(long, default_value_t = 5)]
        reconstruction_runs: usize,
        /// Where generated populations are cached and scratch stores live.
        #[arg(long, default_value = "bench-data")]
        data: PathBuf,
        /// Print the figures as JSON.
        #[arg(long)]
        json: bool,
        /// Also write bench.json and bench.html (charts of the scaling curve) here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Serve the TRE boundary over Arrow Flight SQL (ADBC, JDBC clients).
    Serve {
        #[arg(long)]
        store: PathBuf,
        /// The TRE policy (default: the built-in policies/tre.toml).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// The TRE's perturbation key for projects under the cell key method
        /// (`gpdp keygen`; never the collection key).
        #[arg(long, env = "GPDP_PERTURBATION_KEY", value_name = "KEYFILE")]
        perturbation_key: Option<PathBuf>,
        /// Where the privacy ledgers live, one per population (the collection
        /// key's id): every store of the same patients shares one spend
        /// (default: ledgers/ beside the store).
        #[arg(long, env = "GPDP_LEDGER", value_name = "DIR")]
        ledger: Option<PathBuf>,
        /// Address to listen on: loopback only unless --allow-remote.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: std::net::SocketAddr,
        /// Listen on a non-loopback address (needs --tls-cert and --tls-key:
        /// tokens must not cross a network in clear text).
        #[arg(long)]
        allow_remote: bool,
        /// TLS certificate chain (PEM).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Write the evidence as report.html (charts, offline) and report.json.
    Report {
        #[arg(long)]
        store: PathBuf,
        /// The generator's truth directory (DIR/truth): compare with the full population.
        #[arg(long)]
        truth: Option<PathBuf>,
        /// The collection key: with --truth, the report includes the full audit.
        #[arg(long, requires = "truth")]
        key: Option<PathBuf>,
        /// Where to write report.html and report.json.
        #[arg(long, default_value = "gpdp-report")]
        out: PathBuf,
        /// The attacks' measurement to show (`privacy.json` from `gpdp bench
        /// --privacy-only --out DIR`; default: the one shipped with gpdp).
        #[arg(long)]
        privacy: Option<PathBuf>,
    },
    /// Write the public data-uses register: projects, what they asked and
    /// what was released, opt-out figures, the audit log's head, and a
    /// plain-English section for patients (no pseudonym, key or NHS number).
    Register {
        #[arg(long)]
        store: PathBuf,
        /// The TRE policy whose projects to list (default: the built-in policies/tre.toml).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Where to write register.html and register.json.
        #[arg(long, default_value = "gpdp-register")]
        out: PathBuf,
    },
    /// Make a new 32-byte collection key (file mode 0600; never overwrites).
    Keygen {
        /// Path of the key file to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Change the perturbation key a store's cell-key answers are drawn with.
    ///
    /// The first query under the cell key method binds the store to the
    /// TRE's perturbation key (its id, in the audit log); any other key is
    /// then refused (perturbation_key_changed), because fresh noise on the
    /// same cells could be averaged away. Rotating is deliberate: the
    /// holder of the bound key names the new one and why, in the log.
    RotatePerturbationKey {
        #[arg(long)]
        store: PathBuf,
        /// The key the store is bound to now.
        #[arg(long)]
        from: PathBuf,
        /// The new key (make it with `gpdp keygen`).
        #[arg(long)]
        to: PathBuf,
        /// Why the key changes (published in the audit log).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum OptoutCommand {
    /// A patient's own answer, at the practice (needs the collection key):
    /// are their records in the store, does a Type 1 opt-out or the
    /// National Data Opt-out apply, and which projects' views can include them.
    Status {
        #[arg(long)]
        nhs_number: String,
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// The TRE policy whose projects to check (default: the built-in policies/tre.toml).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pseudonymise the National Data Opt-out list with the collection key and
    /// store it (only pseudonyms are stored); replaces the previous list.
    Ingest {
        /// The NDOO list: a CSV with one column, nhs_number.
        #[arg(long)]
        ndoo: PathBuf,
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Ingest the valid numbers even if some are invalid (they are reported).
        #[arg(long)]
        skip_invalid: bool,
        /// Ingest a list that is empty or lost more than the collection
        /// policy's max_shrink of the patients in force (logged with the counts).
        #[arg(long)]
        accept_shrink: bool,
    },
    /// Delete patients who registered a Type 1 opt-out after collection from
    /// every table of every practice's batch, with proof in the audit log.
    Apply {
        /// The requests: a CSV with header `nhs_number` or
        /// `nhs_number,requested_at` (YYYY-MM-DD or RFC 3339; default: now).
        #[arg(long = "type1")]
        type1: PathBuf,
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Apply the valid lines even if some are invalid (they stay pending).
        #[arg(long)]
        skip_invalid: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Table,
    Csv,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let progress = Progress::new(cli.quiet);
    match run(cli.command, &progress) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let status = exit_status_of(&err);
            let label = match status {
                ExitStatus::Refused => "refused",
                _ => "error",
            };
            eprintln!("gpdp: {label}: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(status as u8)
        }
    }
}

fn default_threads(threads: Option<usize>) -> usize {
    threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn run(command: Command, progress: &Progress) -> anyhow::Result<()> {
    match command {
        Command::Demo { out, threads } => {
            let o = gpdp::demo::run(&out, default_threads(threads), progress)?;
            println!(
                "gpdp demo — every stage on {} synthetic practices",
                gpdp::demo::DEMO_PRACTICES
            );
            println!();
            println!("1. Synthetic GP extracts (identifiable: the practice side)");
            print_synth(&o.report);
            println!();
            println!(
                "2. Collection: de-identified on collection, Type 1 opt-outs honoured at source"
            );
            print_collect_totals(&o.collection);
            println!();
            println!(
                "3. Linked at their providers with the same key (a Type 1 opt-out does not cover them; the NDOO does):"
            );
            for r in &o.linked {
                println!(
                    "   {}: {} rows in, {} stored, {} quarantined (missing or invalid NHS numbers: they cannot link)",
                    r.source,
                    r.rows_in,
                    r.rows_out,
                    r.quarantined.values().sum::<u64>()
                );
            }
            println!(
                "   National Data Opt-out list ingested: {} patients, stored only as pseudonyms",
                o.ndoo.patients
            );
            println!();
            println!(
                "4. Research questions through the TRE boundary (one demo researcher per rule set; answers are disclosure-controlled)"
            );
            println!(
                "   Each researcher's effective guarantee: the weakest rule set they can reach over the same patients"
            );
            for g in &o.guarantees {
                println!(
                    "   {:<6} {:<24} {}",
                    g.user,
                    if g.projects.is_empty() {
                        "(no project)".to_owned()
                    } else {
                        g.projects.join(", ")
                    },
                    g.guarantee
                );
            }
            for q in &o.questions {
                println!();
                println!("  {} [{}, as {}]", q.title, q.project, q.user);
                println!("  SQL: {}", q.sql);
                match &q.answer {
                    Ok(r) => {
                        for line in gpdp::tre::output::to_table(r).lines() {
                            println!("    {line}");
                        }
                    }
                    Err(e) => println!("    {e}"),
                }
            }
            println!();
            let r = &o.later;
            println!(
                "5. Type 1 opt-outs registered after collection: {} patients ({} of them moved practice) deleted from every batch",
                r.applied,
                r.registrations_deleted.saturating_sub(r.applied)
            );
            println!(
                "   {} rows removed ({}), {} files rewritten in {} practice batches, in {:.2} s; proof of deletion in the audit log",
                r.rows_removed.values().sum::<u64>(),
                r.rows_removed
                    .iter()
                    .map(|(t, n)| format!("{t} {n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.files_rewritten,
                r.batches_rewritten,
                r.seconds
            );
            println!();
            println!("6. Audit of the store against the ground truth");
            for line in o.audit.to_table().lines() {
                println!("   {line}");
            }
            println!();
            println!(
                "7. The TRE as a service: gpdp serve at grpc://{} (Arrow Flight SQL), researcher dana with the Rust Flight SQL client",
                o.flight.addr
            );
            println!("  SQL: {}", o.flight.sql);
            for line in gpdp::tre::output::batches_to_table(&o.flight.batches).lines() {
                println!("    {line}");
            }
            println!();
            println!(
                "8. Telling patients: the public data-uses register, and the log head to publish with it"
            );
            println!("   {}", o.register_page.display());
            println!("   head: {}", o.head);
            println!(
                "   check later that the log still extends it: gpdp audit --store {} --expect-head '<head>'",
                o.store.display()
            );
            println!();
            println!(
                "9. A patient's own answer at the practice (gpdp optout status), for the first later Type 1 request in {}",
                o.requests.display()
            );
            for line in o.status.to_text().lines() {
                println!("   {line}");
            }
            println!();
            println!("Outputs:");
            println!(
                "  extracts (identifiable, practice side)  {}/practices/<ODS>/",
                o.extracts.display()
            );
            println!(
                "  National Data Opt-out list              {}/national/ndoo.csv",
                o.extracts.display()
            );
            println!(
                "  ground truth for audits                 {}/truth/",
                o.extracts.display()
            );
            println!(
                "  quarantined rows (practice side)        {}/quarantine/",
                o.extracts.display()
            );
            println!(
                "  collection key (practice side only)     {}",
                o.key.display()
            );
            println!(
                "  TRE perturbation key (TRE side only)    {}",
                o.perturbation_key.display()
            );
            println!(
                "  de-identified store (Parquet)           {}/tables/",
                o.store.display()
            );
            println!(
                "  receipts, one per practice              {}/receipts/",
                o.store.display()
            );
            println!(
                "  hash-chained audit log                  {}/audit/log.jsonl",
                o.store.display()
            );
            println!(
                "  later Type 1 opt-out requests           {}",
                o.requests.display()
            );
            println!(
                "  the report (open it in a browser)       {}",
                o.report_page.display()
            );
            println!(
                "  the public data-uses register           {}",
                o.register_page.display()
            );
            println!();
            println!("Ask your own question (demo credentials):");
            println!(
                "  GPDP_TOKEN=demo-dana-token cargo run --release -- query --store {} --project demo-research --user dana \"SELECT sex, count(*) AS n FROM patients GROUP BY sex\"",
                o.store.display()
            );
            println!(
                "  (demo-research answers with differential privacy and charges dana's budget; carol asks demo-planning-exempt, which needs --perturbation-key {}; alice asks demo-opensafely and priya demo-prescribing-acro, under deterministic rules; each token is demo-<user>-token)",
                o.perturbation_key.display()
            );
            println!(
                "Audit it yourself:\n  cargo run --release -- audit --store {} --truth {}/truth --key {}",
                o.store.display(),
                o.extracts.display(),
                o.key.display()
            );
            o.audit.verdict()?;
            Ok(())
        }
        Command::Synth {
            out,
            practices,
            patients,
            seed,
            start_year,
            extract_date,
            policy,
            threads,
        } => {
            let policy = CollectionPolicy::load(policy.as_deref())?;
            let opts = SynthOptions {
                out,
                practices,
                patients,
                seed,
                start_year,
                extract_date,
                threads: default_threads(threads),
                policy,
            };
            let report = synth::run(&opts, progress)?;
            print_synth(&report);
            Ok(())
        }
        Command::Link {
            extract,
            store,
            key,
            sources,
            policy,
            json,
            accept_shrink,
        } => {
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
        Command::Collect {
            extract,
            store,
            key,
            policy,
            practices,
            quarantine,
            threads,
            json,
            accept_shrink,
        } => {
            let opts = gpdp::collect::CollectOptions {
                extract,
                store,
                key,
                policy: CollectionPolicy::load(policy.as_deref())?,
                practices,
                threads: default_threads(threads),
                quarantine,
                accept_shrink,
            };
            let summary = gpdp::collect::run(&opts, progress)?;
            let held = summary.held();
            if json {
                let receipts: Vec<_> = summary.receipts().collect();
                let held_json: Vec<_> = held
                    .iter()
                    .map(|(practice, h)| serde_json::json!({"practice": practice, "held": h.rule, "detail": h.detail}))
                    .collect();
                let out = serde_json::json!({"totals": gpdp::collect::totals(&summary), "receipts": receipts, "held": held_json});
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print_collect(&opts, &summary);
            }
            if !held.is_empty() {
                return Err(gpdp::store::guard::HeldInputs(held).into());
            }
            Ok(())
        }
        Command::Query {
            store,
            project,
            user,
            token,
            policy,
            format,
            sql,
            sql_file,
            perturbation_key,
            ledger,
        } => {
            let sql = match (sql, sql_file) {
                (Some(sql), _) => sql,
                (None, Some(file)) => read_sql(&file)?,
                (None, None) => unreachable!("clap requires SQL or --sql-file"),
            };
            let mut policy = tre_policy(policy.as_deref(), &store, perturbation_key.as_deref())?;
            policy.ledger_dir = ledger;
            let request = gpdp::tre::Request {
                store,
                user,
                token,
                project,
                sql,
            };
            let released = gpdp::tre::query_blocking(&policy, &request)?;
            match format {
                Format::Table => print!("{}", gpdp::tre::output::to_table(&released)),
                Format::Csv => print!("{}", gpdp::tre::output::to_csv(&released.result)),
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&gpdp::tre::output::to_json(&released))?
                ),
            }
            Ok(())
        }
        Command::Optout {
            command:
                OptoutCommand::Ingest {
                    ndoo,
                    store,
                    key,
                    skip_invalid,
                    accept_shrink,
                },
        } => {
            let policy = CollectionPolicy::load(None)?;
            let r = gpdp::optout::ndoo::ingest(
                &ndoo,
                &store,
                &key,
                skip_invalid,
                accept_shrink,
                &policy,
            )?;
            if r.unchanged {
                println!(
                    "National Data Opt-out list unchanged: {} patients (store generation {})",
                    r.patients, r.generation
                );
            } else {
                println!(
                    "ingested the National Data Opt-out list: {} patients ({} lines, {} invalid skipped); store generation {}",
                    r.patients, r.listed, r.invalid, r.generation
                );
            }
            Ok(())
        }
        Command::Optout {
            command:
                OptoutCommand::Apply {
                    type1,
                    store,
                    key,
                    skip_invalid,
                    json,
                },
        } => {
            let codec = CollectionPolicy::load(None)?.codec;
            let r = gpdp::optout::apply::apply(&type1, &store, &key, skip_invalid, codec)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            let rows: u64 = r.rows_removed.values().sum();
            if r.unchanged {
                println!(
                    "Type 1 requests already applied: {} patients, nothing to delete (store generation {})",
                    r.patients, r.generation
                );
            } else {
                println!(
                    "applied {} Type 1 opt-outs ({} already applied): {} rows of {} registrations deleted from {} practice batches ({} files rewritten); store generation {}",
                    r.applied,
                    r.already_applied,
                    rows,
                    r.registrations_deleted,
                    r.batches_rewritten,
                    r.files_rewritten,
                    r.generation
                );
                for (table, n) in &r.rows_removed {
                    println!("  {table}: {n} rows removed");
                }
            }
            if let (Some(median), Some(max)) = (r.latency_median_seconds, r.latency_max_seconds) {
                println!(
                    "request to deletion: median {}, longest {}",
                    human_duration(median),
                    human_duration(max)
                );
            }
            println!(
                "backlog: {} requests processed, {} pending{}; took {:.2} s",
                r.requests - r.pending,
                r.pending,
                if r.pending > 0 {
                    " (invalid lines: correct them and run again)"
                } else {
                    ""
                },
                r.seconds
            );
            Ok(())
        }
        Command::Audit {
            store,
            truth,
            key,
            verify_log,
            head,
            expect_head,
            json,
        } => {
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
            let r = gpdp::audit::audit(&store, truth, expect_head.as_ref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", r.to_table());
            }
            r.verdict()?;
            Ok(())
        }
        Command::Bench {
            patients,
            practices,
            scale,
            threads,
            tre_runs,
            privacy_targets,
            privacy_only,
            reconstruction_counts,
            reconstruction_runs,
            data,
            json,
            out,
        } => {
            if privacy_only && privacy_targets == 0 && reconstruction_counts == 0 {
                return Err(gpdp::error::BadInput(
                    "--privacy-only measures the privacy attacks: --privacy-targets or --reconstruction-counts must be at least 1"
                        .into(),
                )
                .into());
            }
            if reconstruction_runs == 0 {
                return Err(gpdp::error::BadInput(
                    "--reconstruction-runs must be at least 1".into(),
                )
                .into());
            }
            if patients == 0 || practices == 0 || scale.contains(&0) || threads.contains(&0) {
                return Err(gpdp::error::BadInput(
                    "--patients, --practices and every --scale and --threads must be at least 1"
                        .into(),
                )
                .into());
            }
            let mut threads = if threads.is_empty() {
                vec![1, default_threads(None)]
            } else {
                threads
            };
            threads.sort_unstable();
            threads.dedup();
            let r = gpdp::bench::run::run(
                &gpdp::bench::run::BenchOptions {
                    patients,
                    practices,
                    scales: scale,
                    threads,
                    data,
                    tre_runs,
                    privacy_targets,
                    privacy_only,
                    reconstruction_counts,
                    reconstruction_runs,
                },
                progress,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", r.to_table());
            }
            if let Some(out) = out {
                let page = r.write(&out)?;
                if !json {
                    println!("\ncharts: {}", page.display());
                }
            }
            Ok(())
        }
        Command::Serve {
            store,
            policy,
            perturbation_key,
            ledger,
            listen,
            allow_remote,
            tls_cert,
            tls_key,
        } => {
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(gpdp::serve::Tls { cert, key }),
                _ => None,
            };
            if !gpdp::serve::is_loopback(&listen) && (!allow_remote || tls.is_none()) {
                let why = if allow_remote {
                    "--allow-remote needs TLS (--tls-cert and --tls-key): tokens must not cross a network in clear text"
                } else {
                    "gpdp serve listens on loopback only (127.0.0.1 or ::1); another address needs --allow-remote with TLS (--tls-cert and --tls-key)"
                };
                return Err(gpdp::error::BadInput(format!("{listen}: {why}")).into());
            }
            let scheme = if tls.is_some() { "grpc+tls" } else { "grpc" };
            let mut policy = tre_policy(policy.as_deref(), &store, perturbation_key.as_deref())?;
            policy.ledger_dir = ledger;
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
                policy,
                listen,
                tls,
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
        Command::Report {
            store,
            truth,
            key,
            out,
            privacy,
        } => {
            let input = truth.as_deref().map(|dir| gpdp::report::TruthInput {
                dir,
                key: key.as_deref(),
            });
            let r = gpdp::report::build(&store, input, privacy.as_deref())?;
            let (json, html) = gpdp::report::write(&r, &out)?;
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
        Command::Register { store, policy, out } => {
            let policy = gpdp::policy::tre::TrePolicy::load(policy.as_deref())?;
            let r = gpdp::register::build(&store, &policy)?;
            let (json, html) = gpdp::register::write(&r, &out)?;
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
        Command::Optout {
            command:
                OptoutCommand::Status {
                    nhs_number,
                    store,
                    key,
                    policy,
                    json,
                },
        } => {
            let policy = gpdp::policy::tre::TrePolicy::load(policy.as_deref())?;
            let s = gpdp::optout::status::status(&nhs_number, &store, &key, &policy)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", s.to_text());
            }
            Ok(())
        }
        Command::RotatePerturbationKey {
            store,
            from,
            to,
            reason,
        } => {
            if reason.trim().is_empty() {
                return Err(gpdp::error::BadInput(
                    "--reason must say why the key changes: it is published in the audit log"
                        .into(),
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
        Command::Keygen { out } => {
            gpdp::deid::key::generate(&out).with_context(|| "gpdp keygen".to_string())?;
            println!(
                "wrote a new 32-byte collection key to {} (mode 0600)",
                out.display()
            );
            println!(
                "keep it on the practice side: it must never be copied into the store or the TRE"
            );
            Ok(())
        }
    }
}

/// Seconds as the largest sensible unit.
fn human_duration(seconds: f64) -> String {
    match seconds {
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7200.0 => format!("{:.1} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} days", s / 86_400.0),
    }
}

fn print_synth(r: &SynthReport) {
    let t = &r.tally;
    let pct = |n: u64| 100.0 * n as f64 / t.persons.max(1) as f64;
    for w in &r.warnings {
        eprintln!("gpdp: warning: {w}");
    }
    println!(
        "wrote {} patients ({} registrations) to {}",
        t.persons,
        t.registrations,
        r.out.display()
    );
    println!(
        "  rows: {} patients, {} clinical events, {} medications; {} bad rows (listed in truth/bad_rows.csv)",
        t.rows[0],
        t.rows[1],
        t.rows[2],
        t.bad_by_table.iter().sum::<u64>()
    );
    println!(
        "  Type 1 opted out: {} ({:.1}%); National Data Opt-out: {} ({:.1}%); moved practice: {}; died: {}",
        t.type1_opted_out_persons,
        pct(t.type1_opted_out_persons),
        t.ndoo_persons,
        pct(t.ndoo_persons),
        t.movers,
        t.deaths
    );
    println!(
        "  {:.2}s: {:.2} M rows/s, {:.0} MB/s",
        r.elapsed.as_secs_f64(),
        r.rows_per_second() / 1e6,
        t.bytes as f64 / 1e6 / r.elapsed.as_secs_f64().max(1e-9)
    );
}

fn print_collect(opts: &gpdp::collect::CollectOptions, s: &gpdp::collect::CollectSummary) {
    use gpdp::collect::Outcome;
    println!(
        "collected {} practices into {} (store generation {})",
        s.outcomes.len(),
        opts.store.display(),
        s.generation
    );
    for o in &s.outcomes {
        match o {
            Outcome::Unchanged { practice, batch } => println!(
                "  {practice}  batch {batch}  unchanged (this extract is already in the store)"
            ),
            Outcome::Held { receipt: r, held } => println!(
                "  {}  batch {}  HELD by rule {}: {}; the batch in force stays",
                r.practice, r.batch, held.rule, held.detail
            ),
            Outcome::Committed {
                receipt: r,
                deleted_elsewhere,
            } => {
                let mut line = format!(
                    "  {}  batch {}  {} rows in, {} out; {} patients out, {} withheld (Type 1); {} rows quarantined",
                    r.practice,
                    r.batch,
                    r.rows_in_total(),
                    r.rows_out_total(),
                    r.patients_out,
                    r.type1_excluded_patients,
                    r.quarantined_total()
                );
                if *deleted_elsewhere > 0 {
                    line.push_str(&format!(
                        "; {deleted_elsewhere} patients deleted from other practices' batches"
                    ));
                }
                println!("{line}");
            }
        }
    }
    print_collect_totals(s);
    let quarantine = opts
        .quarantine
        .clone()
        .unwrap_or_else(|| opts.extract.join("quarantine"));
    println!(
        "  quarantined rows are listed, practice side, in {}/",
        quarantine.display()
    );
}

fn print_collect_totals(s: &gpdp::collect::CollectSummary) {
    let t = gpdp::collect::totals(s);
    let n = |k: &str| t[k].as_u64().unwrap_or(0);
    let listing = |k: &str| {
        t[k].as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    println!(
        "  {} rows in, {} out in {:.2}s ({:.2} M rows/s); {} patients out",
        n("rows_in"),
        n("rows_out"),
        s.seconds,
        t["rows_per_second"].as_f64().unwrap_or(0.0) / 1e6,
        n("patients_out")
    );
    println!(
        "  Type 1 opt-out: {} registrations withheld at source, {} tombstones sent; {} registrations held back for a dissent recorded at another practice",
        n("type1_excluded_patients"),
        n("tombstones_emitted"),
        n("withheld_by_tombstone_patients")
    );
    println!(
        "  quarantined (never left the practice): {}",
        listing("quarantined")
    );
    println!(
        "  excluded codes (never left the practice): {}",
        listing("excluded_codes")
    );
}

/// The SQL of `gpdp query --sql-file` (`-`: standard input).
fn read_sql(file: &Path) -> anyhow::Result<String> {
    let read = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(file)
    };
    read.map_err(|e| gpdp::error::BadInput(format!("{}: {e}", file.display())).into())
}

/// The TRE policy, with the perturbation key's record keys when one is given
/// (checked against the store's collection key id).
fn tre_policy(
    policy: Option<&Path>,
    store: &Path,
    perturbation_key: Option<&Path>,
) -> anyhow::Result<gpdp::policy::tre::TrePolicy> {
    let mut policy = gpdp::policy::tre::TrePolicy::load(policy)?;
    if let Some(path) = perturbation_key {
        let manifest = gpdp::store::read_manifest(store)?;
        policy.record_keys = Some(
            gpdp::tre::aggregates::record_keys::RecordKeys::load(
                path,
                manifest.key_id.as_deref().unwrap_or(""),
            )
            .map_err(|e| gpdp::error::BadInput(e.to_string()))?,
        );
    }
    Ok(policy)
}
