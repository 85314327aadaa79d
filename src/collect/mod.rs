//! `gpdp collect`: de-identification on collection (docs/design.md §3).
//!
//! Each practice is collected as its own batch, as every practice would run
//! its own collector: [`practice`] does the work (Type 1 at source, then
//! each row through the de-identification engine, [`crate::deid`], which
//! `gpdp link` shares: pseudonymise, generalise, drop, quarantine; then the
//! exclusion lists) in parallel, one practice per worker; this module
//! commits each finished batch to the store one at a time, so a batch
//! becomes visible all at once or not at all. Commits are grouped: what is
//! staged within a second goes into one manifest swap.
//!
//! Committing a batch also honours tombstones both ways: patients who dissent
//! at this practice are deleted from every other practice's batch (closing
//! the known gap where an opt-out recorded at a new practice left data from
//! the old one visible), and patients tombstoned elsewhere are held back from
//! this batch. A patient whose dissent at this practice has been withdrawn has
//! this practice's tombstone lifted.

mod error;
pub mod practice;
pub mod receipt;

pub use error::CollectError;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use self::practice::{Context, Inputs, Staged, collect_practice, scan_inputs};
use self::receipt::Receipt;
use crate::deid::generalise::PostcodeLookup;
use crate::deid::key::CollectionKey;
use crate::deid::pseudonym::{Pseudonym, Pseudonymiser};
use crate::deid::row::Exclusions;
use crate::digest::hex;
use crate::extract::{PracticeExtract, Table, TableReader};
use crate::nhs_number::NhsNumber;
use crate::optout::apply::REQUEST_SOURCE;
use crate::policy::{Action, CollectionPolicy, Rule};
use crate::progress::Progress;
use crate::store::delete::{BatchMembers, Deleter, TombstoneBook};
use crate::store::guard::{self, Held};
use crate::store::{BatchEntry, FileEntry, Manifest, Store, now_rfc3339};

pub struct CollectOptions {
    pub extract: PathBuf,
    pub store: PathBuf,
    pub key: PathBuf,
    pub policy: CollectionPolicy,
    /// Only these practices (all when empty).
    pub practices: Vec<String>,
    pub threads: usize,
    /// Where quarantined rows are listed (default: `EXTRACT/quarantine`).
    pub quarantine: Option<PathBuf>,
    /// Take a batch the shrink guards would hold ([`crate::store::guard`]),
    /// recording that in the audit log with the counts.
    pub accept_shrink: bool,
}

/// What happened to one practice.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A new batch was committed.
    Committed {
        receipt: Box<Receipt>,
        deleted_elsewhere: u64,
    },
    /// The store already holds this exact extract: nothing changed.
    Unchanged { practice: String, batch: String },
    /// The shrink guards held this extract: the batch in force (if any)
    /// stays, and nothing of this one reached the store.
    Held { receipt: Box<Receipt>, held: Held },
}

#[derive(Debug)]
pub struct CollectSummary {
    pub outcomes: Vec<Outcome>,
    pub seconds: f64,
    pub commit_seconds: f64,
    pub generation: u64,
}

impl CollectSummary {
    pub fn receipts(&self) -> impl Iterator<Item = &Receipt> {
        self.outcomes.iter().filter_map(|o| match o {
            Outcome::Committed { receipt, .. } => Some(receipt.as_ref()),
            Outcome::Unchanged { .. } | Outcome::Held { .. } => None,
        })
    }

    /// The practices whose extracts were held, and why.
    pub fn held(&self) -> Vec<(String, Held)> {
        self.outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Held { receipt, held } => Some((receipt.practice.clone(), held.clone())),
                _ => None,
            })
            .collect()
    }
}

fn uses_lsoa(policy: &CollectionPolicy) -> bool {
    Table::ALL
        .iter()
        .any(|t| policy.actions(*t).contains(&Action::Generalise(Rule::Lsoa)))
}

pub fn run(opts: &CollectOptions, progress: &Progress) -> Result<CollectSummary, CollectError> {
    let started = Instant::now();
    let key = CollectionKey::load(&opts.key)?;
    let pseudonymiser = Pseudonymiser::new(&key);
    let key_id = pseudonymiser.key_id();
    let practices = crate::extract::practices(&opts.extract, &opts.practices)?;
    // Check every input before touching the store: a missing file or column
    // is bad input, and bad input changes nothing.
    for p in &practices {
        for t in Table::ALL {
            TableReader::open(&p.path(t), t)?;
        }
    }
    let reference = opts.extract.join("reference/postcode_lsoa.csv");
    let (lookup, reference_sha) = if uses_lsoa(&opts.policy) {
        let lookup = PostcodeLookup::load(&reference)?;
        (Some(lookup), crate::store::sha256_file(&reference)?.0)
    } else {
        (None, String::new())
    };
    let quarantine_dir = opts
        .quarantine
        .clone()
        .unwrap_or_else(|| opts.extract.join("quarantine"));

    std::fs::create_dir_all(&opts.store).map_err(|e| CollectError::io(&opts.store, e))?;
    let mut store = Store::open_for_write(&opts.store, true)?;
    store.manifest.check_key(&key_id)?;
    let current: HashMap<String, BatchEntry> = store
        .manifest
        .batches
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let store_root = store.root().to_owned();
    let excluded = Exclusions::new(&opts.policy);
    let threads = opts.threads.clamp(1, practices.len());

    // Phase 1 (parallel, cheap): hash every practice's files into its batch
    // id and find its Type 1 codes. Knowing every dissent of this run up
    // front lets each batch hold back patients who dissent at *another*
    // practice at source, instead of rewriting batches after they land.
    let scan_ctx = Context {
        excluded: &excluded,
        policy: &opts.policy,
        pseudonymiser: &pseudonymiser,
        key_id: &key_id,
        lookup: lookup.as_ref(),
        blocked: &HashSet::new(),
        store: &store_root,
        quarantine_dir: &quarantine_dir,
    };
    let scanned = crate::parallel(&practices, threads, |p| {
        scan_inputs(&scan_ctx, p, &reference_sha)
    });
    let inputs = scanned.into_iter().collect::<Result<Vec<_>, _>>()?;
    let changed: HashSet<&str> = practices
        .iter()
        .zip(&inputs)
        .filter(|(p, i)| current.get(&p.code).is_none_or(|e| e.batch != i.batch))
        .map(|(p, _)| p.code.as_str())
        .collect();
    // Opt-outs applied by request (`gpdp optout apply`) end when a practice
    // collected now records a withdrawal on or after the request's date.
    let withdrawn = withdrawn_requests(&store, &practices, &inputs, &changed, &pseudonymiser);
    let blocked = blocked(
        &store,
        &practices,
        &inputs,
        &changed,
        &withdrawn,
        &pseudonymiser,
    );
    // Who is in the batches this run does not collect again: this run's
    // dissenters are deleted from those (the rest hold them back at source).
    let mut members = BatchMembers::load(&store, |practice| !changed.contains(practice), None)?;

    let ctx = Context {
        blocked: &blocked,
        ..scan_ctx
    };
    let bar = progress.bar(practices.len() as u64, "practices");
    let (mut outcomes, work) = unchanged(&practices, inputs, &current, &blocked);
    bar.inc(outcomes.len() as u64);

    // Phase 2 (parallel): collect each practice; commit each batch (serially)
    // as soon as it is staged.
    let committer = Committer {
        store: &mut store,
        book: TombstoneBook::new(&[]),
        current: &current,
        withdrawn: &withdrawn,
        members: &mut members,
        opts,
        key_id: &key_id,
        practices: &practices,
        outcomes: &mut outcomes,
        bar: &bar,
        seconds: 0.0,
    };
    let collected = collect_and_commit(&ctx, work, threads, committer);
    bar.finish_and_clear();
    let commit_seconds = match collected {
        Ok(seconds) => seconds,
        Err(e) => {
            // Staged files of uncommitted batches are unreferenced: remove them.
            let _ = store.collect_garbage();
            return Err(e);
        }
    };
    outcomes.sort_by(|a, b| practice_of(a).cmp(practice_of(b)));
    Ok(CollectSummary {
        outcomes,
        seconds: started.elapsed().as_secs_f64(),
        commit_seconds,
        generation: store.manifest.generation,
    })
}

/// Tombstones as they will be once this run's practices are in: those of
/// practices collected again are replaced by their new dissents, and
/// request tombstones withdrawn since end.
fn blocked(
    store: &Store,
    practices: &[PracticeExtract],
    inputs: &[Inputs],
    changed: &HashSet<&str>,
    withdrawn: &HashSet<Pseudonym>,
    pseudonymiser: &Pseudonymiser,
) -> HashSet<Pseudonym> {
    let mut blocked: HashSet<Pseudonym> = store
        .tombstones
        .iter()
        .filter(|t| {
            t.source
                .strip_prefix("type1:")
                .is_none_or(|p| !changed.contains(p))
        })
        .filter(|t| !(t.source == REQUEST_SOURCE && withdrawn.contains(&t.patient_id)))
        .map(|t| t.patient_id)
        .collect();
    for (p, i) in practices.iter().zip(inputs) {
        if changed.contains(p.code.as_str()) {
            blocked.extend(
                i.type1
                    .iter()
                    .filter(|(_, s)| s.dissents())
                    .filter_map(|(n, _)| NhsNumber::parse(n).ok())
                    .map(|n| pseudonymiser.patient(&n)),
            );
        }
    }
    blocked
}

/// Splits the practices into those the store already holds as they are
/// (their outcomes) and those to collect: unchanged means the same
/// extract, and nobody deleted from it has had their tombstone lifted
/// since (else they must come back).
fn unchanged<'p>(
    practices: &'p [PracticeExtract],
    inputs: Vec<Inputs>,
    current: &HashMap<String, BatchEntry>,
    blocked: &HashSet<Pseudonym>,
) -> (Vec<Outcome>, Vec<(&'p PracticeExtract, Inputs)>) {
    let blocked_hex: HashSet<String> = blocked.iter().map(|p| hex(p)).collect();
    let mut outcomes = Vec::new();
    let mut work = Vec::new();
    for (p, i) in practices.iter().zip(inputs) {
        let unchanged = current.get(&p.code).is_some_and(|e| {
            e.batch == i.batch && e.deleted_patients.iter().all(|d| blocked_hex.contains(d))
        });
        if unchanged {
            outcomes.push(Outcome::Unchanged {
                practice: p.code.clone(),
                batch: i.batch,
            });
        } else {
            work.push((p, i));
        }
    }
    (outcomes, work)
}

/// What committing staged batches needs, and what it has done.
struct Committer<'a> {
    store: &'a mut Store,
    book: TombstoneBook,
    current: &'a HashMap<String, BatchEntry>,
    withdrawn: &'a HashSet<Pseudonym>,
    members: &'a mut BatchMembers,
    opts: &'a CollectOptions,
    key_id: &'a str,
    practices: &'a [PracticeExtract],
    outcomes: &'a mut Vec<Outcome>,
    bar: &'a indicatif::ProgressBar,
    /// Time spent committing.
    seconds: f64,
}

impl Committer<'_> {
    /// Commits a group of staged batches, the shrink guards first.
    fn commit(&mut self, pending: Vec<Staged>) -> Result<(), CollectError> {
        let t = Instant::now();
        let n = pending.len() as u64;
        let (take, held) = guard_batches(
            self.store,
            self.current,
            pending,
            &self.opts.policy.guards,
            self.opts.accept_shrink,
            self.practices,
        );
        self.outcomes.extend(held);
        let group = Group {
            store: self.store,
            book: &mut self.book,
            withdrawn: self.withdrawn,
            members: self.members,
            codec: self.opts.policy.codec,
            key_id: self.key_id,
        };
        let committed = commit_group(group, take);
        self.seconds += t.elapsed().as_secs_f64();
        self.bar.inc(n);
        self.outcomes.extend(committed?);
        Ok(())
    }
}

/// Collects the practices of `work` on `threads` workers and commits each
/// staged batch as it arrives. Group commit: whatever is staged within a
/// second goes into one manifest swap (fewer fsyncs and tombstone rewrites
/// on big runs). The first error stops the workers and is returned.
fn collect_and_commit(
    ctx: &Context,
    work: Vec<(&PracticeExtract, Inputs)>,
    threads: usize,
    mut committer: Committer,
) -> Result<f64, CollectError> {
    committer.book = TombstoneBook::new(&committer.store.tombstones);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let work: Vec<Mutex<Option<(&PracticeExtract, Inputs)>>> =
        work.into_iter().map(|w| Mutex::new(Some(w))).collect();
    let (tx, rx) = mpsc::channel::<Result<Box<Staged>, CollectError>>();
    let mut first_error = None;
    std::thread::scope(|scope| {
        for _ in 0..threads.min(work.len()) {
            let tx = tx.clone();
            let (work, next, stop) = (&work, &next, &stop);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= work.len() || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Some((practice, inputs)) =
                        work[i].lock().unwrap_or_else(|e| e.into_inner()).take()
                    else {
                        continue;
                    };
                    if tx
                        .send(collect_practice(ctx, practice, inputs).map(Box::new))
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut pending: Vec<Staged> = Vec::new();
        let mut last_commit = Instant::now();
        loop {
            let wait = Duration::from_secs(1).saturating_sub(last_commit.elapsed());
            let (closed, received) = match rx.recv_timeout(wait) {
                Ok(r) => (false, Some(r)),
                Err(mpsc::RecvTimeoutError::Timeout) => (false, None),
                Err(mpsc::RecvTimeoutError::Disconnected) => (true, None),
            };
            match received {
                Some(Ok(s)) if first_error.is_none() => pending.push(*s),
                Some(Ok(_)) | None => {}
                Some(Err(e)) => {
                    stop.store(true, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
            }
            let due =
                closed || last_commit.elapsed() >= Duration::from_secs(1) || pending.len() >= 64;
            if due && !pending.is_empty() && first_error.is_none() {
                if let Err(e) = committer.commit(std::mem::take(&mut pending)) {
                    stop.store(true, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
                last_commit = Instant::now();
            }
            if closed {
                break;
            }
        }
    });
    match first_error {
        Some(e) => Err(e),
        None => Ok(committer.seconds),
    }
}

/// Patients with a request tombstone whose opt-out a practice collected in
/// this run records as withdrawn on or after the request's date.
fn withdrawn_requests(
    store: &Store,
    practices: &[PracticeExtract],
    inputs: &[Inputs],
    changed: &HashSet<&str>,
    pseudonymiser: &Pseudonymiser,
) -> HashSet<Pseudonym> {
    let requested: HashMap<Pseudonym, i32> = store
        .tombstones
        .iter()
        .filter(|t| t.source == REQUEST_SOURCE)
        .filter_map(|t| {
            let (y, m, d) = crate::calendar::parse_ymd(t.recorded_at.as_bytes().get(..10)?)?;
            Some((t.patient_id, crate::calendar::days_from_civil(y, m, d)))
        })
        .collect();
    if requested.is_empty() {
        return HashSet::new();
    }
    let mut out = HashSet::new();
    for (p, i) in practices.iter().zip(inputs) {
        if !changed.contains(p.code.as_str()) {
            continue;
        }
        for (nhs, state) in &i.type1 {
            let (Some(day), Ok(n)) = (state.withdrawn_on(), NhsNumber::parse(nhs)) else {
                continue;
            };
            let id = pseudonymiser.patient(&n);
            if requested.get(&id).is_some_and(|&asked| day >= asked) {
                out.insert(id);
            }
        }
    }
    out
}

fn practice_of(o: &Outcome) -> &str {
    match o {
        Outcome::Committed { receipt, .. } | Outcome::Held { receipt, .. } => &receipt.practice,
        Outcome::Unchanged { practice, .. } => practice,
    }
}

/// Splits staged batches into those to commit and those the shrink guards
/// hold ([`crate::store::guard`]): a practice's extract whose patients fell
/// by more than the policy allows against its batch in force, with too much
/// of it quarantined, or with a file cut mid-line. A held batch's staged
/// files are removed and its practice keeps the batch in force; the audit
/// log records the hold (or, with `accept_shrink`, that it was taken
/// anyway, with the same counts).
fn guard_batches(
    store: &Store,
    current: &HashMap<String, BatchEntry>,
    staged: Vec<Staged>,
    guards: &crate::policy::Guards,
    accept_shrink: bool,
    practices: &[PracticeExtract],
) -> (Vec<Staged>, Vec<Outcome>) {
    let mut take = Vec::with_capacity(staged.len());
    let mut held = Vec::new();
    let mut log = Vec::new();
    for s in staged {
        let r = &s.receipt;
        let before = current.get(&s.practice).and_then(|e| {
            let text = std::fs::read(store.path(&e.receipt)).ok()?;
            serde_json::from_slice::<Value>(&text).ok()?["patients_in"].as_u64()
        });
        let files: Vec<PathBuf> = practices
            .iter()
            .filter(|p| p.code == s.practice)
            .flat_map(|p| Table::ALL.iter().map(|t| p.path(*t)))
            .collect();
        // A file that cannot be read now was read a moment ago: it changed
        // under us, which is as good a reason to hold as a cut.
        let cut = guard::truncated(files.iter().map(PathBuf::as_path)).unwrap_or_else(|e| {
            Some(Held {
                rule: "truncated",
                detail: format!("an input file could not be read again: {e}"),
            })
        });
        let reason = cut
            .or_else(|| {
                guard::quarantine_share(
                    guards,
                    r.rows_in.values().sum(),
                    r.quarantined.values().sum(),
                )
            })
            .or_else(|| before.and_then(|b| guard::shrink(guards, "patients", b, r.patients_in)));
        let Some(reason) = reason else {
            take.push(s);
            continue;
        };
        log.push(json!({
            "event": if accept_shrink { "collect_accepted_shrink" } else { "collect_held" },
            "time": now_rfc3339(),
            "practice": s.practice,
            "batch": s.batch,
            "rule": reason.rule,
            "detail": reason.detail,
            "patients_in_force": before,
            "patients_in": r.patients_in,
            "rows_in": r.rows_in.values().sum::<u64>(),
            "quarantined": r.quarantined.values().sum::<u64>(),
        }));
        if accept_shrink {
            take.push(s);
            continue;
        }
        for (_, relative) in &s.files {
            let _ = std::fs::remove_file(store.path(relative));
        }
        held.push(Outcome::Held {
            receipt: Box::new(s.receipt),
            held: reason,
        });
    }
    if !log.is_empty() {
        // The hold is also in the command's output and exit status: a log
        // that cannot take the line must not turn a hold into a take.
        let _ = store.audit().append(&log);
    }
    (take, held)
}

/// Batches staged but not yet committed, and what committing them changes.
pub struct Group<'a> {
    pub store: &'a mut Store,
    pub book: &'a mut TombstoneBook,
    /// Patients whose request tombstone ends with this run (withdrawn since).
    pub withdrawn: &'a HashSet<Pseudonym>,
    /// The patients of the committed batches this run does not collect again.
    pub members: &'a mut BatchMembers,
    pub codec: crate::policy::Codec,
    pub key_id: &'a str,
}

/// Commits several staged batches with one manifest swap: each batch with
/// the tombstone changes it brings (lifts, additions, deletions from other
/// practices' batches), in arrival order.
pub fn commit_group(g: Group, staged: Vec<Staged>) -> Result<Vec<Outcome>, CollectError> {
    let store = g.store;
    let now = now_rfc3339();
    let mut next = store.manifest.clone();
    next.key_id = Some(g.key_id.to_owned());
    let mut log: Vec<Value> = Vec::new();
    let mut outcomes = Vec::new();
    let mut superseded = Vec::new();
    let mut tombstones_changed = false;
    let mut deleter = Deleter::new(store, g.codec);
    for staged in staged {
        let source = format!("type1:{}", staged.practice);
        // Tombstones: lift this practice's for patients it now collects (their
        // dissent here was withdrawn); add one for each patient dissenting here.
        let here = |p: &Pseudonym| staged.patients.binary_search(p).is_ok();
        let lifted = g.book.lift(&source, here)
            + g.book
                .lift(REQUEST_SOURCE, |p| here(p) && g.withdrawn.contains(p));
        let added = g.book.add(&source, &staged.dissenters, &now);
        tombstones_changed |= lifted > 0 || !added.is_empty();

        // This batch: hold back anyone tombstoned since it was prepared.
        let late: HashSet<Pseudonym> = staged
            .patients
            .iter()
            .filter(|p| g.book.is_active(p))
            .copied()
            .collect();
        let mut files = BTreeMap::new();
        for (table, relative) in &staged.files {
            let relative = if late.is_empty() {
                relative.clone()
            } else {
                superseded.push(store.path(relative));
                deleter.rewrite(relative, table.name(), &late)?.0
            };
            files.insert(table.name().to_owned(), store.file_entry(relative)?);
        }
        let mut deleted_here = staged.withheld.clone();
        deleted_here.extend(late.iter().map(|p| hex(p)));
        let patients_out = staged.patients.len() - late.len();

        // Every other batch: delete the patients who dissent here.
        let added_set: HashSet<Pseudonym> = added.iter().copied().collect();
        let elsewhere = deleter.delete_from_batches(
            &mut next,
            g.members,
            &added_set,
            Some(&staged.practice),
        )?;
        // A replaced file that was staged in this same group never reaches a manifest.
        for relative in &elsewhere.replaced {
            if !store
                .manifest
                .batches
                .values()
                .any(|b| b.files.values().any(|f| &f.path == relative))
            {
                superseded.push(store.path(relative));
            }
        }
        let deleted_elsewhere = elsewhere.patients;
        let proof = elsewhere.proof;

        let receipt_rel = format!("receipts/{}.json", staged.batch);
        let receipt_path = store.path(&receipt_rel);
        let receipt_json = serde_json::to_string_pretty(&staged.receipt).unwrap_or_default() + "\n";
        std::fs::write(&receipt_path, receipt_json)
            .map_err(|e| CollectError::io(&receipt_path, e))?;

        let r = &staged.receipt;
        log.push(json!({
            "event": "collect",
            "time": now,
            "practice": staged.practice,
            "batch": staged.batch,
            "key_id": g.key_id,
            "policy_sha256": r.policy_sha256,
            "rows_in": r.rows_in,
            "rows_out": per_table(&files, |f| json!(f.rows)),
            "patients_out": patients_out,
            "type1_excluded_patients": r.type1_excluded_patients,
            "quarantined": r.quarantined,
            "excluded_codes": r.excluded_codes,
            "tombstones_added": added.len(),
            "tombstones_lifted": lifted,
            "files": per_table(&files, |f| json!(f.sha256)),
        }));
        if !proof.is_empty() {
            log.push(json!({
                "event": "delete",
                "time": now,
                "reason": "type1_dissent",
                "source": source,
                "patients": deleted_elsewhere,
                "proof": proof,
            }));
        }
        superseded.extend(staged_and_replaced(store, &next, &staged.practice));
        next.batches.insert(
            staged.practice.clone(),
            BatchEntry {
                batch: staged.batch.clone(),
                practice: staged.practice.clone(),
                policy_sha256: r.policy_sha256.clone(),
                collected_at: r.finished.clone(),
                receipt: receipt_rel,
                files,
                deleted_patients: deleted_here,
                vectors: BTreeMap::new(),
            },
        );
        // The new batch holds none of this run's dissenters (they were
        // held back at source: `blocked`), and only they are deleted from
        // other batches during the run, so no deletion needs to look at it.
        g.members.forget(&staged.practice);
        outcomes.push(Outcome::Committed {
            receipt: Box::new(staged.receipt),
            deleted_elsewhere,
        });
    }

    let tombstones = g.book.to_vec();
    if tombstones_changed {
        next.tombstones = Some(store.write_tombstones(&tombstones, g.codec)?);
    }
    // Masked rows erased with the files this takes out of force: logged
    // in the same commit, with the requests they finish erasing.
    let requests = g.book.of_source(REQUEST_SOURCE);
    if let Some(erased) = crate::optout::purge::by_collection(store, &next, requests, &now)? {
        log.push(erased);
    }
    next.commit_log = log;
    store.commit(next)?;
    for path in superseded {
        if path.exists() {
            std::fs::remove_file(&path).map_err(|e| CollectError::io(&path, e))?;
        }
    }
    store.tombstones = tombstones;
    Ok(outcomes)
}

/// One value per table of a batch's files, as the log records them.
fn per_table(
    files: &BTreeMap<String, FileEntry>,
    value: impl Fn(&FileEntry) -> Value,
) -> serde_json::Map<String, Value> {
    files.iter().map(|(t, f)| (t.clone(), value(f))).collect()
}

/// The files of `practice`'s batch in `next` when that batch was staged in
/// this same group (it is about to be replaced, and never reaches a
/// manifest): none when it is the committed one.
fn staged_and_replaced(store: &Store, next: &Manifest, practice: &str) -> Vec<PathBuf> {
    match next.batches.get(practice) {
        Some(old)
            if store
                .manifest
                .batches
                .get(practice)
                .is_none_or(|b| b.batch != old.batch) =>
        {
            old.files
                .values()
                .chain(old.vectors.values())
                .map(|f| store.path(&f.path))
                .collect()
        }
        _ => Vec::new(),
    }
}

/// Totals over the committed receipts, for the command's summary.
pub fn totals(summary: &CollectSummary) -> Value {
    let mut rows_in = 0u64;
    let mut rows_out = 0u64;
    let mut quarantined: BTreeMap<String, u64> = BTreeMap::new();
    let mut excluded: BTreeMap<String, u64> = BTreeMap::new();
    let (mut patients_out, mut type1, mut tombstones, mut elsewhere) = (0u64, 0u64, 0u64, 0u64);
    for r in summary.receipts() {
        rows_in += r.rows_in_total();
        rows_out += r.rows_out_total();
        patients_out += r.patients_out;
        type1 += r.type1_excluded_patients;
        tombstones += r.tombstones_emitted;
        elsewhere += r.withheld_by_tombstone.patients;
        for (k, v) in &r.quarantined {
            *quarantined.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &r.excluded_codes {
            *excluded.entry(k.clone()).or_default() += v;
        }
    }
    json!({
        "practices_committed": summary.receipts().count(),
        "practices_unchanged": summary.outcomes.len() - summary.receipts().count(),
        "rows_in": rows_in,
        "rows_out": rows_out,
        "patients_out": patients_out,
        "type1_excluded_patients": type1,
        "tombstones_emitted": tombstones,
        "withheld_by_tombstone_patients": elsewhere,
        "quarantined": quarantined,
        "excluded_codes": excluded,
        "seconds": summary.seconds,
        "rows_per_second": rows_in as f64 / summary.seconds.max(1e-9),
        "store_generation": summary.generation,
    })
}
