//! `gpdp audit`: independent checks an information-governance auditor can
//! run against a store, each with its figures and a verdict.
//!
//! Without the truth: the audit log's hash chain (and that every store
//! generation has its commit in the log), that every file is the one the
//! manifest recorded (SHA-256), that no tombstoned patient has a row any
//! reader returns (deletion vectors applied: `tombstoned_patients_unreachable`)
//! and that none whose request is older than the purge deadline has a row
//! in the stored bytes (`tombstoned_patients_absent`). With the generator's truth and the collection key (to
//! pseudonymise the truth's NHS numbers the same way): no Type 1 patient
//! anywhere in the store, exactly the registrations that should have left
//! each practice, no NDOO patient reachable through the views of any project
//! the opt-out applies to (built by the TRE's own session code, the same
//! views researchers query), and quarantine and receipt counts equal to the
//! truth's.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use serde_json::Value;

use crate::deid::key::CollectionKey;
use crate::deid::pseudonym::{Pseudonym, Pseudonymiser, from_slice};
use crate::error::{Classify, ExitStatus};
use crate::nhs_number::NhsNumber;
use crate::store::StoreError;
use crate::store::log::{AuditError, AuditLog, Head, Verified};

#[derive(Debug, thiserror::Error)]
pub enum AuditFailure {
    #[error("audit log check failed: {0}")]
    Broken(AuditError),
    #[error(
        "audit log check failed: store generations {0} have no entry in the audit log (the log was cut short)"
    )]
    Missing(String),
    #[error("no_rollback failed: {0}")]
    Rollback(String),
    #[error("log_extends_head failed: {0}")]
    NotExtended(String),
    #[error("audit failed: {0}")]
    Checks(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for AuditFailure {
    fn exit_status(&self) -> ExitStatus {
        match self {
            AuditFailure::Broken(AuditError::Io { .. }) => ExitStatus::Internal,
            AuditFailure::Broken(_)
            | AuditFailure::Missing(_)
            | AuditFailure::Rollback(_)
            | AuditFailure::NotExtended(_)
            | AuditFailure::Checks(_) => ExitStatus::Refused,
            AuditFailure::Store(e) => e.exit_status(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LogReport {
    pub lines: u64,
    pub head: String,
    pub generation: u64,
    pub queries: u64,
    pub refused: u64,
    /// What `no_rollback` found (the files in force are those the log's
    /// latest commit recorded).
    pub rollback: String,
    /// The head to publish.
    pub published_head: Head,
}

/// Verifies the chain of `STORE/audit/log.jsonl` against the manifest, that
/// the store has not been rolled back behind its log (`no_rollback`), that
/// no privacy charge it records passed its budget
/// (`privacy_budgets_respected`), and, given a published head, that the
/// log still extends it.
pub fn verify_log(store: &Path, expect: Option<&Head>) -> Result<LogReport, AuditFailure> {
    let manifest = crate::store::read_manifest(store)?;
    let verified = AuditLog::at(store).verify().map_err(AuditFailure::Broken)?;
    if let Some(head) = expect {
        verified.extends(head).map_err(AuditFailure::NotExtended)?;
    }
    let summary = log_summary(&manifest, &verified)?;
    let rollback = no_rollback(&manifest, &verified).map_err(AuditFailure::Rollback)?;
    let budgets = budgets_respected(store, &manifest, &verified.entries);
    if !budgets.passed {
        return Err(AuditFailure::Checks(format!(
            "privacy_budgets_respected: {}",
            budgets.detail
        )));
    }
    Ok(LogReport {
        rollback,
        ..summary
    })
}

/// The chain's figures, or `Missing` if a generation of the manifest has
/// no entry in the log.
fn log_summary(
    manifest: &crate::store::Manifest,
    verified: &Verified,
) -> Result<LogReport, AuditFailure> {
    let logged: BTreeSet<u64> = verified
        .entries
        .iter()
        .filter_map(|e| e.get("generation").and_then(Value::as_u64))
        .collect();
    let missing: Vec<String> = (1..=manifest.generation)
        .filter(|g| !logged.contains(g))
        .map(|g| g.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(AuditFailure::Missing(missing.join(", ")));
    }
    let of = |kind: &str| {
        verified
            .entries
            .iter()
            .filter(|e| {
                e.get("event").and_then(Value::as_str) == Some("query")
                    && e.get("outcome").and_then(Value::as_str) == Some(kind)
            })
            .count() as u64
    };
    Ok(LogReport {
        lines: verified.lines,
        head: verified.head.clone(),
        generation: manifest.generation,
        queries: of("released") + of("refused") + of("error"),
        refused: of("refused"),
        rollback: String::new(),
        published_head: verified.head(),
    })
}

/// `no_rollback`: the store in force is the one the log says it should be.
///
/// Replays the `commit` entry of every generation (the files it put in
/// force or took out, checked against its digest) and fails, naming the
/// generation and the files, when
/// - the log records a later generation than the manifest (a store restored
///   from an older copy under the current log);
/// - the manifest's files in force — data, tombstones, the NDOO set —
///   differ from those the log's latest commit recorded;
/// - a file in force is one a deletion's or a purge's proof replaced (its
///   `sha256_before`, or a deletion vector's `vector_sha256_before`: an
///   older vector masks fewer rows) and no later commit put it back.
///
/// Whether the files on disk are the manifest's is `files_match_manifest`;
/// together the two tie what is on disk to the log.
pub fn no_rollback(
    manifest: &crate::store::Manifest,
    verified: &Verified,
) -> Result<String, String> {
    let mut state: BTreeMap<String, String> = BTreeMap::new();
    // When each path last changed, by generation.
    let mut changed_at: BTreeMap<String, u64> = BTreeMap::new();
    // The files deletions replaced: SHA-256 → the deletion's generation.
    let mut deleted: BTreeMap<String, u64> = BTreeMap::new();
    let mut committed: BTreeSet<u64> = BTreeSet::new();
    let mut latest: Option<(u64, String)> = None;
    for e in &verified.entries {
        let generation = e.get("generation").and_then(Value::as_u64);
        let event = e.get("event").and_then(Value::as_str).unwrap_or("");
        if let Some(g) = generation
            && latest.as_ref().is_none_or(|(l, _)| g > *l)
        {
            let time = e.get("time").and_then(Value::as_str).unwrap_or("");
            latest = Some((g, format!("{event} at {time}")));
        }
        if (event == "delete" || event == "purge")
            && let (Some(g), Some(proof)) = (generation, e.get("proof").and_then(Value::as_array))
        {
            for p in proof {
                for key in ["sha256_before", "vector_sha256_before"] {
                    if let Some(before) = p.get(key).and_then(Value::as_str) {
                        deleted.insert(before.to_owned(), g);
                    }
                }
            }
        }
        if event != "commit" {
            continue;
        }
        let Some(g) = generation else {
            return Err("a commit entry without a generation".into());
        };
        if !committed.insert(g) {
            return Err(format!("generation {g} is committed twice in the log"));
        }
        for (path, sha) in e
            .get("files_changed")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            match sha.as_str() {
                Some(sha) => state.insert(path.clone(), sha.to_owned()),
                None => state.remove(path),
            };
            changed_at.insert(path.clone(), g);
        }
        let digest = e.get("in_force_sha256").and_then(Value::as_str);
        if digest != Some(crate::store::in_force_digest(&state).as_str()) {
            return Err(format!(
                "the log's file changes up to generation {g} do not add up to the digest its commit recorded"
            ));
        }
    }
    let Some((last, what)) = latest else {
        return if manifest.generation == 0 {
            Ok("an empty store and an empty log".into())
        } else {
            Err(format!(
                "the manifest is generation {} but the log records none",
                manifest.generation
            ))
        };
    };
    if let Some(g) = (1..=last).find(|g| !committed.contains(g)) {
        return Err(format!(
            "generation {g} has no commit record in the log (cut short, or written by a gpdp before commit records)"
        ));
    }
    let in_force = manifest.files_in_force();
    let mut differ = Vec::new();
    for (path, sha) in &in_force {
        match state.get(path) {
            Some(s) if s == sha => {}
            Some(_) => differ.push(format!("{path} (not the version the log recorded)")),
            None => differ.push(format!("{path} (not in force according to the log)")),
        }
    }
    for path in state.keys().filter(|p| !in_force.contains_key(*p)) {
        differ.push(format!(
            "{path} (in force according to the log, missing from the manifest)"
        ));
    }
    for (path, sha) in &in_force {
        if let Some(g) = deleted.get(sha)
            && changed_at.get(path).is_none_or(|c| c <= g)
        {
            differ.push(format!(
                "{path} (the file generation {g}'s deletion replaced, back in force)"
            ));
        }
    }
    let files = |d: &[String]| {
        let shown: Vec<&str> = d.iter().take(8).map(String::as_str).collect();
        let more = d.len().saturating_sub(shown.len());
        format!(
            "{}{}",
            shown.join(", "),
            if more > 0 {
                format!(", and {more} more")
            } else {
                String::new()
            }
        )
    };
    if last > manifest.generation {
        return Err(format!(
            "the log records generation {last} ({what}) but the manifest in force is generation {}: the store was restored from an older copy; {} files differ from the log's: {}",
            manifest.generation,
            differ.len(),
            files(&differ)
        ));
    }
    if last < manifest.generation {
        return Err(format!(
            "the manifest is generation {} but the log's latest commit is generation {last}",
            manifest.generation
        ));
    }
    if !differ.is_empty() {
        return Err(format!(
            "generation {last}: {} files in force differ from those its commit recorded: {}",
            differ.len(),
            files(&differ)
        ));
    }
    Ok(format!(
        "generation {last} is the log's latest commit ({what}); its {} files in force are those the log recorded",
        in_force.len()
    ))
}

/// One check: its name, verdict and figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditReport {
    pub passed: bool,
    pub generation: u64,
    pub checks: Vec<Check>,
}

/// Where the generator's truth and the collection key are.
pub struct Truth<'a> {
    pub dir: &'a Path,
    pub key: &'a Path,
}

fn check(name: &'static str, passed: bool, detail: impl Into<String>) -> Check {
    Check {
        name,
        passed,
        detail: detail.into(),
    }
}

/// Runs every check the inputs allow; given a published head, also that
/// the log extends it (`log_extends_head`). The purge deadline is the
/// built-in collection policy's (`[erasure]`).
pub fn audit(
    store: &Path,
    truth: Option<Truth>,
    expect: Option<&Head>,
) -> anyhow::Result<AuditReport> {
    let erasure = crate::policy::CollectionPolicy::load(None)?.erasure;
    audit_with(store, truth, expect, erasure)
}

/// [`audit`] with the purge deadline of `erasure`.
pub fn audit_with(
    store: &Path,
    truth: Option<Truth>,
    expect: Option<&Head>,
    erasure: crate::policy::Erasure,
) -> anyhow::Result<AuditReport> {
    let manifest = crate::store::read_manifest(store)?;
    let mut checks = Vec::new();
    let verified = AuditLog::at(store).verify();
    checks.push(match &verified {
        Ok(v) => match log_summary(&manifest, v) {
            Ok(r) => check(
                "audit_log_intact",
                true,
                format!(
                    "{} lines chained; every store generation up to {} recorded; {} queries ({} refused)",
                    r.lines, r.generation, r.queries, r.refused
                ),
            ),
            Err(e) => check("audit_log_intact", false, e.to_string()),
        },
        Err(e @ AuditError::Io { .. }) => return Err(anyhow::anyhow!("{e}")),
        Err(e) => check("audit_log_intact", false, format!("audit log check failed: {e}")),
    });
    checks.push(match &verified {
        Ok(v) => match no_rollback(&manifest, v) {
            Ok(detail) => check("no_rollback", true, detail),
            Err(detail) => check("no_rollback", false, detail),
        },
        Err(_) => check(
            "no_rollback",
            false,
            "the audit log cannot be read as a chain",
        ),
    });
    if let Some(head) = expect {
        checks.push(match &verified {
            Ok(v) => match v.extends(head) {
                Ok(()) => check(
                    "log_extends_head",
                    true,
                    format!(
                        "the log ({} lines) extends the published head at line {} (generation {})",
                        v.lines, head.seq, head.generation
                    ),
                ),
                Err(detail) => check("log_extends_head", false, detail),
            },
            Err(_) => check(
                "log_extends_head",
                false,
                "the audit log cannot be read as a chain",
            ),
        });
    }
    checks.push(match &verified {
        Ok(v) => budgets_respected(store, &manifest, &v.entries),
        Err(_) => check(
            "privacy_budgets_respected",
            false,
            "the audit log cannot be read as a chain, so its charges cannot be replayed",
        ),
    });
    let intact = files_intact(store, &manifest)?;
    if !intact.passed {
        // Reading a file that is not what was committed would prove
        // nothing about the store (or stop at its first bad byte): the
        // checks that read data say why they did not run, and fail.
        let mut skipped = vec![
            "tombstoned_patients_unreachable",
            "tombstoned_patients_absent",
        ];
        if truth.is_some() {
            skipped.extend([
                "type1_patients_absent",
                "registrations_match_truth",
                "ndoo_patients_unreachable",
                "quarantine_matches_truth",
                "receipts_match_truth",
            ]);
            if !manifest.linked.is_empty() {
                skipped.push("linked_records_match_truth");
            }
        }
        checks.push(intact);
        checks.extend(skipped.into_iter().map(|name| {
            check(
                name,
                false,
                "not checked: the store's files do not match its manifest (see files_match_manifest)",
            )
        }));
        return Ok(AuditReport {
            passed: false,
            generation: manifest.generation,
            checks,
        });
    }
    checks.push(intact);
    let stored = StoredPatients::read(store, &manifest)?;
    let tombstones = match &manifest.tombstones {
        Some(t) => crate::store::read_tombstones(&store.join(&t.path))?,
        None => Vec::new(),
    };
    let tombstoned: HashSet<Pseudonym> = tombstones.iter().map(|t| t.patient_id).collect();
    let found = stored.reachable_of(&tombstoned);
    checks.push(check(
        "tombstoned_patients_unreachable",
        found.is_empty(),
        format!(
            "{} tombstoned patients; {} of them have rows a reader returns (deletion vectors applied){}",
            tombstoned.len(),
            found.len(),
            stored.describe(&stored.reachable, &found)
        ),
    ));
    checks.push(absent_after_deadline(&stored, &tombstones, erasure));
    if let Some(truth) = truth {
        checks.extend(against_truth(
            store,
            &manifest,
            &stored,
            &tombstoned,
            &truth,
        )?);
    }
    Ok(AuditReport {
        passed: checks.iter().all(|c| c.passed),
        generation: manifest.generation,
        checks,
    })
}

/// The privacy charges replayed: every `privacy_charge` of the
/// population's ledger (`dp::ledger_path`: where `GPDP_LEDGER` says, or
/// `ledgers/` beside the store), whose chain must verify, and the copies in
/// the store's own log, each researcher's spend summed afresh. At no
/// charge may the sum pass the budget the charge recorded, and no charge
/// may record a spend below what had already been charged — a ledger that
/// was reset (from a cache, a restored copy, an edited line) shows as
/// exactly that. (A store's copies may record more than the store's own
/// charges: the population's other stores spend from the same budget.)
fn budgets_respected(store: &Path, manifest: &crate::store::Manifest, log: &[Value]) -> Check {
    let mut problems = Vec::new();
    let (charges, users) = replay(log, false, "the store's log", &mut problems);
    let dir = std::env::var_os("GPDP_LEDGER").map(std::path::PathBuf::from);
    let path = crate::tre::control::dp::ledger_path(
        store,
        dir.as_deref(),
        manifest.key_id.as_deref().unwrap_or_default(),
    );
    let mut ledger = format!("no population ledger at {}", path.display());
    if path.exists() {
        match AuditLog::file(path.clone()).verify() {
            Ok(v) => {
                let (n, u) = replay(&v.entries, true, "the population's ledger", &mut problems);
                ledger = format!(
                    "the population's ledger ({}): {n} charges for {u} researchers, its chain intact",
                    path.display()
                );
            }
            Err(e) => problems.push(format!(
                "the population's ledger {} does not verify: {e}",
                path.display()
            )),
        }
    }
    check(
        "privacy_budgets_respected",
        problems.is_empty(),
        if problems.is_empty() {
            format!(
                "{charges} privacy charges in the store's log for {users} researchers and {ledger}: none over their budget, none recording less than had been charged"
            )
        } else {
            format!("{} problems: {}", problems.len(), problems.join("; "))
        },
    )
}

/// Replays `entries`' charges into `problems`; `exact`: every charge must
/// record exactly the replayed spend (a ledger), else at least it (a
/// store's copies). Returns the charges and researchers counted.
fn replay(
    entries: &[Value],
    exact: bool,
    what: &str,
    problems: &mut Vec<String>,
) -> (usize, usize) {
    let mut spent: BTreeMap<&str, f64> = BTreeMap::new();
    let mut cells: BTreeMap<&str, u64> = BTreeMap::new();
    let mut charges = 0;
    for (i, e) in entries.iter().enumerate() {
        if e["event"] == "cell_charge" {
            charges += 1;
            let line = i + 1;
            let (Some(user), Some(n), Some(budget)) = (
                e["user"].as_str(),
                e["cells"].as_u64(),
                e["cell_budget"].as_u64(),
            ) else {
                problems.push(format!(
                    "{what}, line {line}: a cell charge without a user, cells and budget"
                ));
                continue;
            };
            let total = cells.entry(user).or_default();
            *total += n;
            let recorded = e["spent_cells"].as_u64().unwrap_or(*total);
            if recorded.max(*total) > budget {
                problems.push(format!(
                    "{what}, line {line}: {user} has been given {} released cells in all, over a budget of {budget}",
                    recorded.max(*total)
                ));
            }
            if recorded < *total || (exact && recorded > *total) {
                problems.push(format!(
                    "{what}, line {line}: the charge records {user}'s released cells as {recorded}, but {total} had been charged by then (the ledger was reset?)"
                ));
            }
            continue;
        }
        if e["event"] != "privacy_charge" {
            continue;
        }
        charges += 1;
        let line = i + 1;
        let (Some(user), Some(rho)) = (e["user"].as_str(), e["rho"].as_f64()) else {
            problems.push(format!(
                "{what}, line {line}: a charge without a user and ρ"
            ));
            continue;
        };
        let total = spent.entry(user).or_default();
        *total += rho;
        let tolerance = 1e-9 * total.abs().max(1.0);
        let recorded = e["spent"].as_f64().unwrap_or(*total);
        // What the charge says was spent, or what the replay says, the larger.
        let at_least = recorded.max(*total);
        match e["budget"].as_f64() {
            Some(budget) if at_least > budget + tolerance => problems.push(format!(
                "{what}, line {line}: {user} has been charged ρ {at_least:.4} in all, over a budget of {budget:.4}"
            )),
            Some(_) => {}
            None => problems.push(format!("{what}, line {line}: a charge without its budget")),
        }
        if recorded < *total - tolerance || (exact && recorded > *total + tolerance) {
            problems.push(format!(
                "{what}, line {line}: the charge records {user}'s spend as {recorded:.4}, but {total:.4} had been charged by then (the ledger was reset?)"
            ));
        }
    }
    (charges, spent.len().max(cells.len()))
}

/// Every file the manifest names exists with the recorded SHA-256.
fn files_intact(store: &Path, manifest: &crate::store::Manifest) -> anyhow::Result<Check> {
    let files: Vec<&crate::store::FileEntry> = manifest.all_files().collect();
    let mut bad = Vec::new();
    for f in &files {
        match crate::store::sha256_file(&store.join(&f.path)) {
            Ok((sha, _)) if sha == f.sha256 => {}
            Ok(_) => bad.push(format!("{} (checksum differs)", f.path)),
            Err(_) => bad.push(format!("{} (missing)", f.path)),
        }
    }
    Ok(check(
        "files_match_manifest",
        bad.is_empty(),
        if bad.is_empty() {
            format!(
                "{} files, each with the SHA-256 the manifest recorded",
                files.len()
            )
        } else {
            format!(
                "{} of {} files differ: {}",
                bad.len(),
                files.len(),
                bad.join(", ")
            )
        },
    ))
}

/// `tombstoned_patients_absent`: no tombstoned patient whose request (the
/// tombstone's earliest `recorded_at`) is older than the purge deadline
/// has a row in the stored bytes, masked or not.
fn absent_after_deadline(
    stored: &StoredPatients,
    tombstones: &[crate::store::Tombstone],
    erasure: crate::policy::Erasure,
) -> Check {
    let deadline =
        chrono::Utc::now() - chrono::Duration::days(i64::from(erasure.purge_deadline_days));
    let mut requested: BTreeMap<Pseudonym, Option<chrono::DateTime<chrono::Utc>>> = BTreeMap::new();
    for t in tombstones {
        // A time that does not parse counts as overdue: fail safe.
        let at = chrono::DateTime::parse_from_rfc3339(&t.recorded_at)
            .ok()
            .map(|a| a.with_timezone(&chrono::Utc));
        let e = requested.entry(t.patient_id).or_insert(at);
        *e = match (*e, at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            _ => None,
        };
    }
    let overdue: HashSet<Pseudonym> = requested
        .iter()
        .filter(|(_, at)| at.is_none_or(|a| a < deadline))
        .map(|(p, _)| *p)
        .collect();
    let found = stored.stored_of(&overdue);
    let all: HashSet<Pseudonym> = requested.keys().copied().collect();
    let awaiting = stored.stored_of(&all).len() - found.len();
    check(
        "tombstoned_patients_absent",
        found.is_empty(),
        format!(
            "{} tombstoned patients, {} of them requested more than {} days ago (the purge deadline); {} of those still have rows in the stored bytes{}; {} more, within the deadline, are masked awaiting the purge",
            all.len(),
            overdue.len(),
            erasure.purge_deadline_days,
            found.len(),
            stored.describe(&stored.by_table, &found),
            awaiting
        ),
    )
}

/// The pseudonyms in every table file, by table — in the stored bytes and
/// as readers see them (deletion vectors applied) — and the (patient,
/// practice) registrations readers see in the patients tables.
struct StoredPatients {
    by_table: BTreeMap<String, HashSet<Pseudonym>>,
    reachable: BTreeMap<String, HashSet<Pseudonym>>,
    registrations: HashSet<(Pseudonym, Pseudonym)>,
}

impl StoredPatients {
    fn read(store: &Path, manifest: &crate::store::Manifest) -> anyhow::Result<StoredPatients> {
        use arrow::array::{Array, FixedSizeBinaryArray};
        let mut by_table: BTreeMap<String, HashSet<Pseudonym>> = BTreeMap::new();
        let mut reachable: BTreeMap<String, HashSet<Pseudonym>> = BTreeMap::new();
        let mut registrations = HashSet::new();
        for batch in manifest.batches.values() {
            for (table, file) in &batch.files {
                let path = store.join(&file.path);
                // Fails closed: a vector that does not verify is an error.
                let dv = crate::store::parquet::vector(store, batch, table)?;
                let reader = crate::store::parquet::reader(&path, None)?.build()?;
                let ids = by_table.entry(table.clone()).or_default();
                let seen = reachable.entry(table.clone()).or_default();
                let mut at = 0u64;
                for b in reader {
                    let b = b?;
                    let col = |name: &str| {
                        b.column_by_name(name)
                            .and_then(|c| c.as_any().downcast_ref::<FixedSizeBinaryArray>())
                            .cloned()
                    };
                    let Some(patients) = col("patient_id") else {
                        anyhow::bail!("{}: no patient_id column", path.display());
                    };
                    let practices = col("practice_id");
                    for i in 0..patients.len() {
                        let id = from_slice(patients.value(i));
                        ids.insert(id);
                        let masked = dv.as_ref().is_some_and(|dv| dv.contains(at + i as u64));
                        if masked {
                            continue;
                        }
                        seen.insert(id);
                        if let Some(pr) = &practices {
                            registrations.insert((id, from_slice(pr.value(i))));
                        }
                    }
                    at += patients.len() as u64;
                }
            }
        }
        Ok(StoredPatients {
            by_table,
            reachable,
            registrations,
        })
    }

    /// Which of `patients` have a row in the stored bytes of any table.
    fn stored_of(&self, patients: &HashSet<Pseudonym>) -> HashSet<Pseudonym> {
        self.by_table
            .values()
            .flat_map(|ids| ids.intersection(patients))
            .copied()
            .collect()
    }

    /// Which of `patients` have a row a reader returns, in any table.
    fn reachable_of(&self, patients: &HashSet<Pseudonym>) -> HashSet<Pseudonym> {
        self.reachable
            .values()
            .flat_map(|ids| ids.intersection(patients))
            .copied()
            .collect()
    }

    /// ": N in patients, M in clinical_events…" for the patients found in `sets`.
    fn describe(
        &self,
        sets: &BTreeMap<String, HashSet<Pseudonym>>,
        found: &HashSet<Pseudonym>,
    ) -> String {
        if found.is_empty() {
            return String::new();
        }
        let parts: Vec<String> = sets
            .iter()
            .map(|(t, ids)| format!("{} in {t}", ids.intersection(found).count()))
            .collect();
        format!(" ({})", parts.join(", "))
    }
}

/// One row of `truth/patients.csv`.
struct TruthRow {
    patient: Pseudonym,
    practice: String,
    type1: bool,
    ndoo: bool,
}

fn read_truth(dir: &Path, p: &Pseudonymiser) -> anyhow::Result<Vec<TruthRow>> {
    let path = dir.join("patients.csv");
    let mut reader = csv::Reader::from_path(&path).map_err(|e| {
        crate::error::BadInput(format!("cannot read the truth {}: {e}", path.display()))
    })?;
    let headers = reader.headers()?.clone();
    let at = |name: &str| {
        headers.iter().position(|h| h == name).ok_or_else(|| {
            crate::error::BadInput(format!("{} has no column {name}", path.display()))
        })
    };
    let (nhs, practice, type1, ndoo) = (
        at("nhs_number")?,
        at("practice")?,
        at("type1_at_extract")?,
        at("ndoo")?,
    );
    let mut rows = Vec::new();
    for r in reader.records() {
        let r = r?;
        let number = NhsNumber::parse(r[nhs].as_bytes()).map_err(|_| {
            crate::error::BadInput(format!(
                "{}: invalid NHS number in the truth",
                path.display()
            ))
        })?;
        rows.push(TruthRow {
            patient: p.patient(&number),
            practice: r[practice].to_owned(),
            type1: &r[type1] == "true",
            ndoo: &r[ndoo] == "true",
        });
    }
    Ok(rows)
}

fn against_truth(
    store: &Path,
    manifest: &crate::store::Manifest,
    stored: &StoredPatients,
    tombstoned: &HashSet<Pseudonym>,
    truth: &Truth,
) -> anyhow::Result<Vec<Check>> {
    let key = CollectionKey::load(truth.key)?;
    let p = Pseudonymiser::new(&key);
    manifest.check_key(&p.key_id())?;
    let rows = read_truth(truth.dir, &p)?;
    let collected: BTreeSet<&str> = manifest.batches.keys().map(String::as_str).collect();
    let mut checks = Vec::new();

    // Type 1: no patient who dissents at a collected practice, anywhere.
    let type1: HashSet<Pseudonym> = rows
        .iter()
        .filter(|r| r.type1 && collected.contains(r.practice.as_str()))
        .map(|r| r.patient)
        .collect();
    // In the stored bytes: Type 1 dissent at collection is never collected.
    let found = stored.stored_of(&type1);
    checks.push(check(
        "type1_patients_absent",
        found.is_empty(),
        format!(
            "{} patients dissent (Type 1) at the {} collected practices; {} have rows in the store{}",
            type1.len(),
            collected.len(),
            found.len(),
            stored.describe(&stored.by_table, &found)
        ),
    ));

    // Registrations readers see (deletion vectors applied): exactly those
    // of collected practices whose patient is neither a Type 1 dissenter
    // nor tombstoned.
    let expected: HashSet<(Pseudonym, Pseudonym)> = rows
        .iter()
        .filter(|r| collected.contains(r.practice.as_str()))
        .filter(|r| !type1.contains(&r.patient) && !tombstoned.contains(&r.patient))
        .map(|r| (r.patient, p.practice(&r.practice)))
        .collect();
    let missing = expected.difference(&stored.registrations).count();
    let unexpected = stored.registrations.difference(&expected).count();
    checks.push(check(
        "registrations_match_truth",
        missing == 0 && unexpected == 0,
        format!(
            "{} registrations expected, {} stored: {missing} missing, {unexpected} that should not be there",
            expected.len(),
            stored.registrations.len()
        ),
    ));

    checks.push(ndoo_unreachable(store, manifest, &rows)?);
    checks.extend(receipts_match_truth(store, manifest, truth.dir, &rows)?);
    if !manifest.linked.is_empty() {
        checks.push(linked_match_truth(store, manifest, truth.dir, &p, &rows)?);
    }
    Ok(checks)
}

/// Provider data against `truth/linkage.csv`: each linked source holds
/// exactly the rows whose NHS number the provider recorded validly (and
/// every patient of them), the rest quarantined; and the Type 1 rule is
/// the GP-only one — Type 1 patients' hospital and death records are kept
/// (a Type 1 opt-out stops data leaving the practice), while
/// `type1_patients_absent` shows none of their GP data is.
fn linked_match_truth(
    store: &Path,
    manifest: &crate::store::Manifest,
    truth_dir: &Path,
    p: &Pseudonymiser,
    rows: &[TruthRow],
) -> anyhow::Result<Check> {
    // Per source: (stored rows, quarantined rows, stored patients).
    let mut expected: BTreeMap<String, (u64, u64, HashSet<Pseudonym>)> = BTreeMap::new();
    for r in crate::synth::linked::read_linkage_truth(&truth_dir.join("linkage.csv"))? {
        let e = expected.entry(r.source.clone()).or_default();
        if r.stored() {
            e.0 += 1;
            e.2.insert(p.patient(&r.person));
        } else {
            e.1 += 1;
        }
    }
    let type1: HashSet<Pseudonym> = rows.iter().filter(|r| r.type1).map(|r| r.patient).collect();
    let (mut passed, mut parts) = (true, Vec::new());
    for (source, entry) in &manifest.linked {
        let (rows_want, quarantined_want, patients_want) =
            expected.get(source).cloned().unwrap_or_default();
        let stored: HashSet<Pseudonym> =
            crate::store::parquet::patient_ids(&store.join(&entry.file.path), None)?
                .into_iter()
                .collect();
        let receipt: Value = serde_json::from_slice(&std::fs::read(store.join(&entry.receipt))?)?;
        let quarantined: u64 = receipt["quarantined"]
            .as_object()
            .map_or(0, |q| q.values().filter_map(Value::as_u64).sum());
        let ok = entry.file.rows == rows_want
            && quarantined == quarantined_want
            && stored == patients_want;
        passed &= ok;
        parts.push(format!(
            "{source}: {} rows stored ({rows_want} expected), {quarantined} quarantined ({quarantined_want} expected), {} patients{}; {} of them Type 1 patients, kept (Type 1 covers GP data only)",
            entry.file.rows,
            stored.len(),
            if stored == patients_want { "" } else { " (NOT the truth's)" },
            stored.intersection(&type1).count()
        ));
    }
    Ok(check(
        "linked_records_match_truth",
        passed,
        parts.join("; "),
    ))
}

/// Through the TRE's own views: no NDOO patient reachable by a project the
/// opt-out applies to.
fn ndoo_unreachable(
    store: &Path,
    manifest: &crate::store::Manifest,
    rows: &[TruthRow],
) -> anyhow::Result<Check> {
    use arrow::array::{Array, FixedSizeBinaryArray};
    let ndoo: HashSet<Pseudonym> = rows.iter().filter(|r| r.ndoo).map(|r| r.patient).collect();
    let policy = crate::policy::tre::TrePolicy::load(None)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut parts = Vec::new();
    let mut passed = true;
    for project in policy.projects.values() {
        let session =
            match rt.block_on(crate::tre::session::open(store, manifest, &policy, project)) {
                Ok(s) => s,
                Err(crate::tre::TreError::Refused(r))
                    if project.ndoo_applies && r.rule == "ndoo_not_ingested" =>
                {
                    // Fail closed: no list ingested, so the project sees nothing.
                    parts.push(format!("{}: nothing reachable ({})", project.id, r.rule));
                    continue;
                }
                Err(e) => return Err(anyhow::anyhow!("opening {}'s views: {e}", project.id)),
            };
        let mut reachable = HashSet::new();
        for table in &project.tables {
            let sql = format!("SELECT DISTINCT patient_id FROM {table}");
            let batches = rt.block_on(async { session.ctx.sql(&sql).await?.collect().await })?;
            for b in &batches {
                let ids = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<FixedSizeBinaryArray>()
                    .ok_or_else(|| anyhow::anyhow!("{table}.patient_id is not a pseudonym"))?;
                for i in 0..ids.len() {
                    let id = from_slice(ids.value(i));
                    if ndoo.contains(&id) {
                        reachable.insert(id);
                    }
                }
            }
        }
        if project.ndoo_applies {
            passed &= reachable.is_empty();
            parts.push(format!(
                "{} (NDOO applies): {} NDOO patients reachable",
                project.id,
                reachable.len()
            ));
        } else {
            parts.push(format!(
                "{} (exempt): {} NDOO patients visible, as its exemption allows",
                project.id,
                reachable.len()
            ));
        }
    }
    Ok(check(
        "ndoo_patients_unreachable",
        passed,
        format!("{} patients on the NDOO; {}", ndoo.len(), parts.join("; ")),
    ))
}

/// Per collected practice: quarantine counts by reason equal the truth's bad
/// rows, and the receipt's Type 1 count equals the truth's.
fn receipts_match_truth(
    store: &Path,
    manifest: &crate::store::Manifest,
    truth_dir: &Path,
    rows: &[TruthRow],
) -> anyhow::Result<Vec<Check>> {
    let path = truth_dir.join("bad_rows.csv");
    let mut reader = csv::Reader::from_path(&path).map_err(|e| {
        crate::error::BadInput(format!("cannot read the truth {}: {e}", path.display()))
    })?;
    let mut bad: BTreeMap<(String, String), u64> = BTreeMap::new();
    for r in reader.records() {
        let r = r?;
        *bad.entry((r[0].to_owned(), r[3].to_owned())).or_default() += 1;
    }
    let (mut quarantine_off, mut type1_off) = (Vec::new(), Vec::new());
    let (mut quarantined, mut type1_total) = (0u64, 0u64);
    for (practice, batch) in &manifest.batches {
        let receipt: Value = serde_json::from_slice(&std::fs::read(store.join(&batch.receipt))?)?;
        let mut counted: BTreeMap<(String, String), u64> = BTreeMap::new();
        if let Some(q) = receipt["quarantined"].as_object() {
            for (reason, n) in q {
                let n = n.as_u64().unwrap_or(0);
                if n > 0 {
                    counted.insert((practice.clone(), reason.clone()), n);
                    quarantined += n;
                }
            }
        }
        let expected: BTreeMap<(String, String), u64> = bad
            .iter()
            .filter(|((p, _), _)| p == practice)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        if counted != expected {
            quarantine_off.push(practice.clone());
        }
        let want = rows
            .iter()
            .filter(|r| r.type1 && &r.practice == practice)
            .count() as u64;
        let got = receipt["type1_excluded_patients"]
            .as_u64()
            .unwrap_or(u64::MAX);
        type1_total += want;
        if got != want {
            type1_off.push(format!(
                "{practice} ({got} in the receipt, {want} in the truth)"
            ));
        }
    }
    Ok(vec![
        check(
            "quarantine_matches_truth",
            quarantine_off.is_empty(),
            if quarantine_off.is_empty() {
                format!(
                    "{quarantined} rows quarantined across {} practices, reason by reason as the truth lists them",
                    manifest.batches.len()
                )
            } else {
                format!(
                    "quarantine counts differ from the truth at {}",
                    quarantine_off.join(", ")
                )
            },
        ),
        check(
            "receipts_match_truth",
            type1_off.is_empty(),
            if type1_off.is_empty() {
                format!("{type1_total} Type 1 patients withheld at source, as the truth says")
            } else {
                format!("Type 1 counts differ: {}", type1_off.join(", "))
            },
        ),
    ])
}

impl AuditReport {
    /// `Err` naming the failed checks, if any failed (exit 3).
    pub fn verdict(&self) -> Result<(), AuditFailure> {
        let failed: Vec<&str> = self
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name)
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(AuditFailure::Checks(format!(
                "{} of {} checks failed: {}",
                failed.len(),
                self.checks.len(),
                failed.join(", ")
            )))
        }
    }

    /// The checks as a table for people.
    pub fn to_table(&self) -> String {
        let width = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut out = format!("{:width$}  result  figures\n", "check");
        for c in &self.checks {
            out += &format!(
                "{:width$}  {:6}  {}\n",
                c.name,
                if c.passed { "pass" } else { "FAIL" },
                c.detail
            );
        }
        out += &format!(
            "verdict: {} (store generation {})\n",
            if self.passed {
                "every check passed"
            } else {
                "FAILED"
            },
            self.generation
        );
        out
    }
}
