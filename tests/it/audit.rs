//! `gpdp audit` seen failing, one check at a time, and each of the TRE
//! views' opt-out filters seen working on its own.
//!
//! The audit is an information-governance auditor's independent evidence,
//! so a check that always passed would be worse than none. Each test below
//! copies one small store (collected, NDOO ingested, provider data linked,
//! a refused query logged, a later opt-out applied and purged), tampers with the copy
//! as a real regression or a hand edit would — a Type 1 patient's events
//! written, a registration lost, the NDOO list short of a patient, a
//! receipt's counts wrong, a provider record dropped, the log edited or
//! re-chained, a file changed behind the manifest — and runs the real
//! binary, `gpdp audit --json` against the generator's truth and the head
//! published before the tamper. It asserts the exact set of checks that
//! fail (so a check that always passed, or one that failed for the wrong
//! reason, shows) and exit status 3. Where a tamper must write data, it
//! commits through the store's own commit path, so the manifest, the
//! checksums and the log agree and only the check under test can notice.
//! The positive control: the untampered copy passes every check, and it
//! runs exactly the checks this file has a case for.
//!
//! Lines of defence alone: the views' tombstone and NDOO filters must hide
//! a patient whose rows are still in the data files — a tombstone committed
//! without rewriting a file; an NDOO patient, whose rows stay by design —
//! checked through `gpdp::tre::query_blocking` against counts read from the
//! raw Parquet. Their positive control is the same query on the same store
//! without that patient's tombstone or NDOO entry, which shows the patient.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::common::*;
use arrow::array::{ArrayRef, BooleanArray, FixedSizeBinaryArray, Int64Array, RecordBatch};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use gpdp::policy::Codec;
use gpdp::store::{FileEntry, Manifest, Store, Tombstone};
use serde_json::{Value, json};

const KEY: u8 = 77;

/// Every check `gpdp audit` runs given the truth and a published head, in
/// its order. Each has a test below that sees it fail; a new check fails
/// the positive control until it gets one.
const CHECKS: [&str; 13] = [
    "audit_log_intact",
    "no_rollback",
    "log_extends_head",
    "privacy_budgets_respected",
    "files_match_manifest",
    "tombstoned_patients_unreachable",
    "tombstoned_patients_absent",
    "type1_patients_absent",
    "registrations_match_truth",
    "ndoo_patients_unreachable",
    "quarantine_matches_truth",
    "receipts_match_truth",
    "linked_records_match_truth",
];

/// One registration in the generator's truth.
struct Person {
    nhs: String,
    practice: String,
    type1: bool,
    type1_anywhere: bool,
    ndoo: bool,
}

fn people(extract: &Path) -> Vec<Person> {
    Csv::read(&extract.join("truth/patients.csv"))
        .records()
        .into_iter()
        .map(|r| Person {
            nhs: r["nhs_number"].clone(),
            practice: r["practice"].clone(),
            type1: r["type1_at_extract"] == "true",
            type1_anywhere: r["type1_anywhere"] == "true",
            ndoo: r["ndoo"] == "true",
        })
        .collect()
}

/// The pseudonyms with a row in `table`'s files.
fn stored(store: &Path, table: &str) -> HashSet<[u8; 32]> {
    patient_ids(&read_table(store, table)).into_iter().collect()
}

/// The TRE's counting key of a pseudonym (its first 8 bytes, big-endian),
/// computed here.
fn key_of(id: &[u8; 32]) -> i64 {
    i64::from_be_bytes(id[..8].try_into().unwrap())
}

/// The shared store every test copies.
struct Base {
    c: Collected,
    /// `gpdp audit --head` once the store was built.
    head: String,
    /// The patient whose later opt-out was applied (deleted, tombstoned).
    erased: [u8; 32],
    /// Their practice's clinical_events file as it was before the deletion.
    events_before: Vec<u8>,
    erased_practice: String,
    /// Another patient of that kind (one practice, events, no opt-out
    /// list), still stored, for the tampers that opt them out.
    spare: String,
}

fn base() -> &'static Base {
    static B: OnceLock<Base> = OnceLock::new();
    B.get_or_init(|| {
        let c = collected_with_ndoo(2, 400, 26, KEY);
        let o = link(&c, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        // A refused query, so that the log holds one to tamper with.
        let o = query_as_alice(&c.store, &["SELECT patient_id FROM patients"]);
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
        // A later opt-out applied: a patient at one practice, with events,
        // on no opt-out list.
        let people = people(&c.extract);
        let mut registrations: HashMap<&str, usize> = HashMap::new();
        for p in &people {
            *registrations.entry(&p.nhs).or_default() += 1;
        }
        let events = stored(&c.store, "clinical_events");
        let mut candidates = people.iter().filter(|p| {
            !p.type1_anywhere
                && !p.ndoo
                && registrations[p.nhs.as_str()] == 1
                && events.contains(&pseudonym(KEY, &p.nhs))
        });
        let erased = candidates.next().expect("a patient to opt out later");
        let spare = candidates.next().expect("a second one").nhs.clone();
        let m = manifest(&c.store);
        let events_path = m["batches"][&erased.practice]["files"]["clinical_events"]["path"]
            .as_str()
            .unwrap();
        let events_before = std::fs::read(c.store.join(events_path)).unwrap();
        let list = c._dir.path().join("requests.csv");
        std::fs::write(
            &list,
            format!("nhs_number,requested_at\n{},2026-04-01\n", erased.nhs),
        )
        .unwrap();
        let o = optout_apply(&c.store, &c.key, &list)
            .arg("--purge")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let o = run(&["audit", "--store", c.store.to_str().unwrap(), "--head"]);
        assert!(o.status.success(), "{}", stderr(&o));
        Base {
            head: stdout(&o).trim().to_owned(),
            erased: pseudonym(KEY, &erased.nhs),
            erased_practice: erased.practice.clone(),
            events_before,
            spare,
            c,
        }
    })
}

/// A copy of the base store, to tamper with.
struct Scratch {
    _dir: tempfile::TempDir,
    store: PathBuf,
}

fn copy_of_base() -> Scratch {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // `cp -a`: the store holds symlinks (optouts/tombstones.parquet).
    let o = std::process::Command::new("cp")
        .arg("-a")
        .arg(&base().c.store)
        .arg(&store)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    Scratch { _dir: dir, store }
}

/// `gpdp audit --json` on `store` against the truth and the base's head:
/// the exit code, the checks that ran, those that failed, and the report.
fn audit(store: &Path) -> (Option<i32>, Vec<String>, BTreeSet<String>, String) {
    let b = base();
    let o = gpdp()
        .args(["audit", "--store"])
        .arg(store)
        .arg("--truth")
        .arg(b.c.extract.join("truth"))
        .arg("--key")
        .arg(&b.c.key)
        .args(["--expect-head", &b.head, "--json"])
        .output()
        .unwrap();
    let out = stdout(&o);
    let report: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {out}{}", stderr(&o)));
    let checks = report["checks"].as_array().unwrap();
    let ran = checks
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    let failed = checks
        .iter()
        .filter(|c| c["passed"] != true)
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    (o.status.code(), ran, failed, out)
}

/// The audit of `store` fails exactly `expected`, with exit status 3,
/// having run every check.
fn assert_fails_exactly(store: &Path, expected: &[&str]) {
    let (code, ran, failed, report) = audit(store);
    assert_eq!(ran, CHECKS, "the audit ran other checks:\n{report}");
    let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    assert_eq!(failed, expected, "the checks that failed:\n{report}");
    assert_eq!(code, Some(3), "exit status:\n{report}");
}

/// Commits a change to the store through its own commit path (manifest,
/// checksums and a `commit` line in the log all agree), as a regression in
/// gpdp would.
fn commit(store: &Path, change: impl FnOnce(&Store, &mut Manifest)) {
    let mut s = Store::open_for_write(store, false).unwrap();
    let mut next = s.manifest.clone();
    next.commit_log = vec![json!({"event": "tampered", "time": gpdp::store::now_rfc3339()})];
    change(&s, &mut next);
    s.commit(next).unwrap();
}

/// Writes `batches` as the store file `relative` and describes it.
fn write_file(s: &Store, relative: &str, batches: &[RecordBatch]) -> FileEntry {
    write_parquet(&s.path(relative), batches, Codec::Zstd(1));
    s.file_entry(relative.to_owned()).unwrap()
}

fn write_parquet(path: &Path, batches: &[RecordBatch], codec: Codec) {
    let mut w = gpdp::store::parquet::Writer::create(path, batches[0].schema(), codec).unwrap();
    for b in batches {
        w.write(b).unwrap();
    }
    w.finish().unwrap();
}

/// The rows of `batches` that `keep` keeps (by row number across batches).
fn filter_rows(
    batches: &[RecordBatch],
    keep: impl Fn(usize, &[u8; 32]) -> bool,
) -> Vec<RecordBatch> {
    let mut row = 0;
    batches
        .iter()
        .map(|b| {
            let ids = patient_ids(std::slice::from_ref(b));
            let mask: BooleanArray = ids
                .iter()
                .enumerate()
                .map(|(i, id)| Some(keep(row + i, id)))
                .collect();
            row += b.num_rows();
            arrow::compute::filter_record_batch(b, &mask).unwrap()
        })
        .collect()
}

/// `batches`' rows of patient `from`, as rows of patient `to`.
fn rows_as(batches: &[RecordBatch], from: &[u8; 32], to: &[u8; 32]) -> Vec<RecordBatch> {
    filter_rows(batches, |_, id| id == from)
        .into_iter()
        .filter(|b| b.num_rows() > 0)
        .map(|b| {
            let schema = b.schema();
            let columns: Vec<ArrayRef> = schema
                .fields()
                .iter()
                .zip(b.columns())
                .map(|(f, c)| match f.name().as_str() {
                    "patient_id" => Arc::new(
                        FixedSizeBinaryArray::try_from_iter(std::iter::repeat_n(to, b.num_rows()))
                            .unwrap(),
                    ) as ArrayRef,
                    "patient_key" => {
                        Arc::new(Int64Array::from(vec![key_of(to); b.num_rows()])) as ArrayRef
                    }
                    _ => c.clone(),
                })
                .collect();
            RecordBatch::try_new(schema, columns).unwrap()
        })
        .collect()
}

fn file_path(m: &Manifest, practice: &str, table: &str) -> String {
    m.batches[practice].files[table].path.clone()
}

fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(|b| b.num_rows()).sum()
}

/// A Type 1 patient: dissent recorded at their practice, not on the NDOO.
fn type1_patient() -> Person {
    people(&base().c.extract)
        .into_iter()
        .find(|p| p.type1 && !p.ndoo)
        .expect("a Type 1 patient not on the NDOO")
}

/// Adds a Type 1 patient's events (another patient's of the same file,
/// re-labelled) to their practice's clinical_events file; with
/// `drop_tombstone`, also takes their tombstone out.
fn leak_type1_events(store: &Path, drop_tombstone: bool) {
    let t = type1_patient();
    let id = pseudonym(KEY, &t.nhs);
    assert!(!stored(store, "clinical_events").contains(&id));
    commit(store, |s, next| {
        let path = file_path(next, &t.practice, "clinical_events");
        let mut batches = read_parquet(&s.path(&path));
        let donor = patient_ids(&batches)[0];
        let leaked = rows_as(&batches, &donor, &id);
        assert!(rows(&leaked) > 0);
        batches.extend(leaked);
        let entry = write_file(s, "tables/clinical_events/tampered.parquet", &batches);
        next.batches
            .get_mut(&t.practice)
            .unwrap()
            .files
            .insert("clinical_events".into(), entry);
        if drop_tombstone {
            let kept: Vec<Tombstone> = s
                .tombstones
                .iter()
                .filter(|x| x.patient_id != id)
                .cloned()
                .collect();
            assert_eq!(
                kept.len() + 1,
                s.tombstones.len(),
                "the Type 1 patient had a tombstone"
            );
            next.tombstones = Some(s.write_tombstones(&kept, Codec::Zstd(1)).unwrap());
        }
    });
}

/// Positive control: the untampered copy passes every check (exit 0), and
/// the audit runs exactly the checks this file has a failing case for.
#[test]
fn the_untampered_store_passes_every_check_and_each_check_has_a_case_here() {
    let copy = copy_of_base();
    let (code, ran, failed, report) = audit(&copy.store);
    assert_eq!(
        ran, CHECKS,
        "the audit's checks changed: give each new one a failing case here\n{report}"
    );
    assert!(failed.is_empty(), "{report}");
    assert_eq!(code, Some(0), "{report}");
}

/// `audit_log_intact`: a refused query relabelled as released in the log
/// breaks the hash chain. The log can then not be replayed for
/// `no_rollback` nor matched to the published head, so those two fail with
/// it (a chain that cannot be read proves nothing), and only those.
#[test]
fn audit_log_intact_fails_when_a_refused_query_is_relabelled_released() {
    let copy = copy_of_base();
    let path = copy.store.join("audit/log.jsonl");
    let log = std::fs::read_to_string(&path).unwrap();
    assert_eq!(log.matches("\"outcome\":\"refused\"").count(), 1);
    std::fs::write(
        &path,
        log.replace("\"outcome\":\"refused\"", "\"outcome\":\"released\""),
    )
    .unwrap();
    assert_fails_exactly(
        &copy.store,
        &[
            "audit_log_intact",
            "no_rollback",
            "log_extends_head",
            "privacy_budgets_respected",
        ],
    );
}

/// `privacy_budgets_respected`: a privacy charge appended through the
/// log's own API (so the chain holds, the head is extended and every
/// commit replays) that takes a researcher past the budget it records.
#[test]
fn privacy_budgets_respected_fails_when_the_log_charges_past_a_budget() {
    let copy = copy_of_base();
    gpdp::store::log::AuditLog::at(&copy.store)
        .append(&[serde_json::json!({
            "event": "privacy_charge", "time": "2026-12-07T00:00:00Z", "user": "dana",
            "project": "demo-research", "rho": 0.5, "spent": 0.5, "budget": 0.4,
            "plan_fingerprint": "x",
        })])
        .unwrap();
    assert_fails_exactly(&copy.store, &["privacy_budgets_respected"]);
}

/// `log_extends_head`: the log rewritten without the refused query and
/// re-chained verifies on its own and replays every commit, but no longer
/// extends the head published before.
#[test]
fn log_extends_head_fails_when_the_log_is_rewritten_without_a_query() {
    let copy = copy_of_base();
    let log = gpdp::store::log::AuditLog::at(&copy.store);
    let text = std::fs::read_to_string(log.path()).unwrap();
    let entries: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["entry"].clone())
        .filter(|e| e["outcome"] != "refused")
        .collect();
    assert_eq!(entries.len() + 1, text.lines().count());
    std::fs::write(log.path(), "").unwrap();
    log.append(&entries).unwrap();
    assert_fails_exactly(&copy.store, &["log_extends_head"]);
}

/// `files_match_manifest`: one event row removed from a data file in place
/// (the manifest and the log untouched).
#[test]
fn files_match_manifest_fails_when_a_row_is_removed_behind_the_manifest() {
    let copy = copy_of_base();
    let m = gpdp::store::read_manifest(&copy.store).unwrap();
    let practice = m.batches.keys().next().unwrap();
    let path = copy.store.join(file_path(&m, practice, "clinical_events"));
    let batches = read_parquet(&path);
    let kept = filter_rows(&batches, |row, _| row != 0);
    assert_eq!(rows(&kept) + 1, rows(&batches));
    write_parquet(&path, &kept, Codec::Zstd(1));
    // Nothing is read from bytes the manifest did not record: the checks
    // that read the data say they did not run, and fail with it.
    assert_fails_exactly(
        &copy.store,
        &[
            "files_match_manifest",
            "tombstoned_patients_unreachable",
            "tombstoned_patients_absent",
            "type1_patients_absent",
            "registrations_match_truth",
            "ndoo_patients_unreachable",
            "quarantine_matches_truth",
            "receipts_match_truth",
            "linked_records_match_truth",
        ],
    );
}

/// `no_rollback`: a data file replaced outside gpdp (the same rows,
/// re-encoded) and the manifest edited by hand to match, so every checksum
/// agrees; only the log knows that file was never committed.
#[test]
fn no_rollback_fails_when_the_manifest_is_edited_to_a_file_the_log_never_committed() {
    let copy = copy_of_base();
    let m = gpdp::store::read_manifest(&copy.store).unwrap();
    let practice = m.batches.keys().next().unwrap().clone();
    let old = file_path(&m, &practice, "clinical_events");
    let new = "tables/clinical_events/replaced.parquet";
    write_parquet(
        &copy.store.join(new),
        &read_parquet(&copy.store.join(&old)),
        Codec::None,
    );
    let (sha, bytes) = gpdp::store::sha256_file(&copy.store.join(new)).unwrap();
    let mut json = manifest(&copy.store);
    let entry = &mut json["batches"][&practice]["files"]["clinical_events"];
    assert_ne!(entry["sha256"], sha.as_str());
    entry["path"] = json!(new);
    entry["sha256"] = json!(sha);
    entry["bytes"] = json!(bytes);
    std::fs::write(
        copy.store.join("manifest.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    assert_fails_exactly(&copy.store, &["no_rollback"]);
}

/// `tombstoned_patients_unreachable` and `tombstoned_patients_absent`: a
/// later commit puts back the events file from before a later opt-out's
/// deletion (under a new name, committed, so the log and checksums agree):
/// the patient is readable again, and in the bytes long after their
/// request. The patient opted out after the extract, so the truth's Type 1
/// check has nothing to say about them.
#[test]
fn tombstoned_patients_absent_fails_when_a_commit_brings_back_deleted_events() {
    let b = base();
    let copy = copy_of_base();
    let restored = copy.store.join("tables/clinical_events/restored.parquet");
    commit(&copy.store, |s, next| {
        std::fs::write(&restored, &b.events_before).unwrap();
        let entry = s
            .file_entry("tables/clinical_events/restored.parquet".into())
            .unwrap();
        next.batches
            .get_mut(&b.erased_practice)
            .unwrap()
            .files
            .insert("clinical_events".into(), entry);
    });
    assert!(stored(&copy.store, "clinical_events").contains(&b.erased));
    assert_fails_exactly(
        &copy.store,
        &[
            "tombstoned_patients_unreachable",
            "tombstoned_patients_absent",
        ],
    );
}

/// `gpdp optout apply` (no purge) on a copy of the base for the spare
/// patient, requested at `date` (`None`: now).
fn apply_spare(store: &Path, date: Option<&str>) -> [u8; 32] {
    let b = base();
    let list = store.with_file_name("spare.csv");
    std::fs::write(
        &list,
        format!(
            "nhs_number,requested_at\n{},{}\n",
            b.spare,
            date.unwrap_or("")
        ),
    )
    .unwrap();
    let o = optout_apply(store, &b.c.key, &list).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    pseudonym(KEY, &b.spare)
}

/// `tombstoned_patients_unreachable` alone: a later opt-out applied today
/// (unreachable, in the bytes within the purge deadline: the audit passes),
/// then a commit drops the deletion vector of their events file — a reader
/// would return their events again. Their patients row stays masked, so
/// the registrations still match the truth.
#[test]
fn tombstoned_patients_unreachable_fails_when_a_commit_drops_a_deletion_vector() {
    let copy = copy_of_base();
    let id = apply_spare(&copy.store, None);
    let (code, _, failed, report) = audit(&copy.store);
    assert!(failed.is_empty() && code == Some(0), "{report}");
    assert!(stored(&copy.store, "clinical_events").contains(&id));
    commit(&copy.store, |_, next| {
        let batch = next
            .batches
            .values_mut()
            .find(|b| b.vectors.contains_key("clinical_events"))
            .expect("the events file got a vector");
        batch.vectors.remove("clinical_events");
    });
    assert_fails_exactly(&copy.store, &["tombstoned_patients_unreachable"]);
}

/// `tombstoned_patients_absent` alone: a later opt-out requested long
/// before the purge deadline, applied but never purged — unreachable, and
/// still in the bytes.
#[test]
fn tombstoned_patients_absent_fails_when_an_old_request_is_not_purged() {
    let copy = copy_of_base();
    let id = apply_spare(&copy.store, Some("2026-01-02"));
    assert!(stored(&copy.store, "clinical_events").contains(&id));
    assert_fails_exactly(&copy.store, &["tombstoned_patients_absent"]);
    // A deadline longer than the request's age lets it pass.
    let b = base();
    let policy = copy.store.with_file_name("collection.toml");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/collection.toml"),
    )
    .unwrap();
    std::fs::write(&policy, text + "\n[erasure]\npurge_deadline_days = 3650\n").unwrap();
    let o = gpdp()
        .args(["audit", "--store"])
        .arg(&copy.store)
        .arg("--truth")
        .arg(b.c.extract.join("truth"))
        .arg("--key")
        .arg(&b.c.key)
        .arg("--policy")
        .arg(&policy)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}

/// `type1_patients_absent`, as a regression leaves it: a Type 1 patient's
/// events written to the store (committed), while collection still
/// recorded their tombstone — so the tombstone check fails beside it (the
/// reachable one: the tombstone is younger than the purge deadline).
#[test]
fn type1_patients_absent_fails_when_a_type1_patients_events_are_stored() {
    let copy = copy_of_base();
    leak_type1_events(&copy.store, false);
    assert_fails_exactly(
        &copy.store,
        &["tombstoned_patients_unreachable", "type1_patients_absent"],
    );
}

/// `type1_patients_absent` alone: the same leak with the patient's
/// tombstone gone too, so only the check against the truth can see it.
#[test]
fn type1_patients_absent_alone_sees_a_type1_patient_the_tombstones_forgot() {
    let copy = copy_of_base();
    leak_type1_events(&copy.store, true);
    assert_fails_exactly(&copy.store, &["type1_patients_absent"]);
}

/// `registrations_match_truth`: one registration that should have left
/// (a patient on no opt-out list) missing from the patients table, the
/// patient's events still there (committed).
#[test]
fn registrations_match_truth_fails_when_a_registration_is_lost() {
    let copy = copy_of_base();
    let people = people(&base().c.extract);
    let kept = stored(&copy.store, "patients");
    let lost = people
        .iter()
        .find(|p| !p.type1_anywhere && !p.ndoo && kept.contains(&pseudonym(KEY, &p.nhs)))
        .unwrap();
    let id = pseudonym(KEY, &lost.nhs);
    commit(&copy.store, |s, next| {
        let path = file_path(next, &lost.practice, "patients");
        let batches = read_parquet(&s.path(&path));
        let kept = filter_rows(&batches, |_, p| *p != id);
        assert_eq!(rows(&kept) + 1, rows(&batches));
        let entry = write_file(s, "tables/patients/tampered.parquet", &kept);
        next.batches
            .get_mut(&lost.practice)
            .unwrap()
            .files
            .insert("patients".into(), entry);
    });
    assert_fails_exactly(&copy.store, &["registrations_match_truth"]);
}

/// `ndoo_patients_unreachable`: the NDOO list ingested short of one
/// patient whose rows are in the store (as an ingest that lost an entry
/// would leave it), through the real `gpdp optout ingest`.
#[test]
fn ndoo_patients_unreachable_fails_when_the_list_loses_a_patient() {
    let b = base();
    let copy = copy_of_base();
    let (list, dropped) = ndoo_list_without_one(&copy.store);
    let o = run(&[
        "optout",
        "ingest",
        "--ndoo",
        list.to_str().unwrap(),
        "--store",
        copy.store.to_str().unwrap(),
        "--key",
        b.c.key.to_str().unwrap(),
        // One of a short list is more than the shrink guard lets through.
        "--accept-shrink",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stored(&copy.store, "patients").contains(&dropped));
    assert_fails_exactly(&copy.store, &["ndoo_patients_unreachable"]);
}

/// The extract's NDOO list without one patient whose GP rows are stored,
/// written beside `store`; and that patient.
fn ndoo_list_without_one(store: &Path) -> (PathBuf, [u8; 32]) {
    let b = base();
    let on_list = Csv::read(&b.c.extract.join("national/ndoo.csv"));
    let stored = stored(store, "patients");
    let nhs = on_list
        .rows
        .iter()
        .map(|(_, r)| r[0].clone())
        .find(|n| stored.contains(&pseudonym(KEY, n)))
        .expect("an NDOO patient with rows in the store");
    let mut text = "nhs_number\n".to_owned();
    for (_, r) in &on_list.rows {
        if r[0] != nhs {
            text += &format!("{}\n", r[0]);
        }
    }
    let list = store.with_file_name("ndoo-short.csv");
    std::fs::write(&list, text).unwrap();
    (list, pseudonym(KEY, &nhs))
}

/// Edits one practice's receipt (receipts are not data files: no checksum
/// covers them, only the truth can tell them wrong).
fn edit_receipt(store: &Path, edit: impl FnOnce(&mut Value)) {
    let m = gpdp::store::read_manifest(store).unwrap();
    let path = store.join(&m.batches.values().next().unwrap().receipt);
    let mut receipt: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut receipt);
    std::fs::write(&path, serde_json::to_string_pretty(&receipt).unwrap()).unwrap();
}

/// `receipts_match_truth`: a receipt counting one Type 1 patient fewer
/// than its practice withheld.
#[test]
fn receipts_match_truth_fails_when_a_receipt_undercounts_type1_patients() {
    let copy = copy_of_base();
    edit_receipt(&copy.store, |r| {
        let n = r["type1_excluded_patients"].as_u64().unwrap();
        assert!(n > 0, "the practice withheld no Type 1 patient");
        r["type1_excluded_patients"] = json!(n - 1);
    });
    assert_fails_exactly(&copy.store, &["receipts_match_truth"]);
}

/// `quarantine_matches_truth`: a receipt putting one quarantined row under
/// the wrong reason (the total unchanged).
#[test]
fn quarantine_matches_truth_fails_when_a_row_is_quarantined_for_the_wrong_reason() {
    let copy = copy_of_base();
    edit_receipt(&copy.store, |r| {
        let q = r["quarantined"].as_object_mut().unwrap();
        let (reason, n) = q
            .iter()
            .find(|(_, n)| n.as_u64().unwrap() > 0)
            .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
            .expect("a quarantined row");
        let other = if reason == "malformed_date" {
            "invalid_nhs_number"
        } else {
            "malformed_date"
        };
        let m = q.get(other).and_then(Value::as_u64).unwrap_or(0);
        q.insert(reason, json!(n - 1));
        q.insert(other.into(), json!(m + 1));
    });
    assert_fails_exactly(&copy.store, &["quarantine_matches_truth"]);
}

/// `linked_records_match_truth`: one hospital spell dropped from the linked
/// provider file (committed).
#[test]
fn linked_records_match_truth_fails_when_a_provider_record_is_dropped() {
    let copy = copy_of_base();
    commit(&copy.store, |s, next| {
        let linked = next.linked.get_mut("apcs").expect("apcs linked");
        let batches = read_parquet(&s.path(&linked.file.path));
        let kept = filter_rows(&batches, |row, _| row != 0);
        assert_eq!(rows(&kept) + 1, rows(&batches));
        linked.file = write_file(s, "tables/apcs/tampered.parquet", &kept);
    });
    assert_fails_exactly(&copy.store, &["linked_records_match_truth"]);
}

// ---------------------------------------------------------------------------
// Each line of defence alone: the views' opt-out filters.

/// The shipped policy with demo-opensafely's rule set made the identity (no
/// threshold, no rounding), so that counts compare exactly: under test here
/// are the views' filters, not the disclosure rules.
fn exact_policy() -> gpdp::policy::tre::TrePolicy {
    let mut policy = gpdp::policy::tre::TrePolicy::load(None).unwrap();
    let d = &mut policy
        .projects
        .get_mut("demo-opensafely")
        .unwrap()
        .disclosure;
    d.redact_at_or_below = 0;
    d.round_to = 1;
    policy
}

/// `sql` through the TRE as alice in demo-opensafely (the NDOO applies):
/// the count of each group, by the group's key values as text.
fn released_counts(store: &Path, sql: &str) -> BTreeMap<Vec<String>, u64> {
    let request = gpdp::tre::Request {
        store: store.to_owned(),
        user: "alice".into(),
        token: Some("demo-alice-token".into()),
        project: "demo-opensafely".into(),
        sql: sql.into(),
    };
    let released = gpdp::tre::query_blocking(&gpdp::tre::Boundary::new(exact_policy()), &request)
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let b = &released.result.batch;
    let text = |c: usize, i: usize| {
        ArrayFormatter::try_new(b.column(c).as_ref(), &FormatOptions::default())
            .unwrap()
            .value(i)
            .to_string()
    };
    let last = b.num_columns() - 1;
    (0..b.num_rows())
        .map(|i| {
            (
                (0..last).map(|c| text(c, i)).collect(),
                text(last, i).parse::<f64>().unwrap() as u64,
            )
        })
        .collect()
}

/// Counts of `table`'s rows in the raw Parquet files by the values of
/// `columns`, leaving out the rows of `hidden` patients: the oracle.
fn raw_counts(
    store: &Path,
    table: &str,
    columns: &[&str],
    hidden: &HashSet<[u8; 32]>,
) -> BTreeMap<Vec<String>, u64> {
    let mut out = BTreeMap::new();
    for b in read_table(store, table) {
        let ids = patient_ids(std::slice::from_ref(&b));
        let formatters: Vec<_> = columns
            .iter()
            .map(|c| {
                ArrayFormatter::try_new(
                    b.column_by_name(c).unwrap().as_ref(),
                    &FormatOptions::default(),
                )
                .unwrap()
            })
            .collect();
        for (i, id) in ids.iter().enumerate() {
            if !hidden.contains(id) {
                let key = formatters.iter().map(|f| f.value(i).to_string()).collect();
                *out.entry(key).or_default() += 1;
            }
        }
    }
    out
}

const BY_AREA: &str =
    "SELECT sex, imd_decile, count(*) AS n FROM patients GROUP BY sex, imd_decile";
const BY_CODE: &str =
    "SELECT snomedct_code, count(*) AS n FROM clinical_events GROUP BY snomedct_code";

/// What the views release equals the raw files' counts without `hidden`,
/// for patients (by sex and IMD decile) and events (by code).
fn assert_views_hide_exactly(store: &Path, hidden: &HashSet<[u8; 32]>, what: &str) {
    assert_eq!(
        released_counts(store, BY_AREA),
        raw_counts(store, "patients", &["sex", "imd_decile"], hidden),
        "{what}: patients by sex and IMD decile"
    );
    assert_eq!(
        released_counts(store, BY_CODE),
        raw_counts(store, "clinical_events", &["snomedct_code"], hidden),
        "{what}: events by code"
    );
}

/// The NDOO patients of the truth, pseudonymised here.
fn ndoo_patients() -> HashSet<[u8; 32]> {
    people(&base().c.extract)
        .iter()
        .filter(|p| p.ndoo)
        .map(|p| pseudonym(KEY, &p.nhs))
        .collect()
}

/// The tombstone filter on its own: a patient tombstoned by a commit that
/// rewrote no data file — their patients row and events still in the
/// files — is in no count the views release. Positive control: the same
/// queries on the same store before that commit count them.
#[test]
fn the_views_hide_a_tombstoned_patient_whose_rows_are_still_in_the_files() {
    let b = base();
    let ndoo = ndoo_patients();
    let people = people(&b.c.extract);
    let control = copy_of_base();
    let events = stored(&control.store, "clinical_events");
    let registered = stored(&control.store, "patients");
    let target = people
        .iter()
        .map(|p| pseudonym(KEY, &p.nhs))
        .find(|id| !ndoo.contains(id) && events.contains(id) && registered.contains(id))
        .unwrap();
    let with_tombstone = copy_of_base();
    let files_before = manifest(&with_tombstone.store)["batches"].clone();
    commit(&with_tombstone.store, |s, next| {
        let mut t = s.tombstones.clone();
        t.push(Tombstone {
            patient_id: target,
            source: "type1-request:test".into(),
            recorded_at: gpdp::store::now_rfc3339(),
        });
        next.tombstones = Some(s.write_tombstones(&t, Codec::Zstd(1)).unwrap());
    });
    // The data files are untouched: the rows are still there.
    assert_eq!(manifest(&with_tombstone.store)["batches"], files_before);
    assert!(stored(&with_tombstone.store, "patients").contains(&target));
    assert!(stored(&with_tombstone.store, "clinical_events").contains(&target));

    let mut hidden = ndoo.clone();
    hidden.insert(target);
    assert_views_hide_exactly(&with_tombstone.store, &hidden, "tombstoned");
    // Positive control: without the tombstone the views count the patient.
    assert_ne!(
        raw_counts(&control.store, "patients", &["sex", "imd_decile"], &hidden),
        raw_counts(&control.store, "patients", &["sex", "imd_decile"], &ndoo),
    );
    assert_views_hide_exactly(&control.store, &ndoo, "no tombstone");
}

/// The NDOO filter on its own: an NDOO patient's rows stay in the files by
/// design, and no count a project the opt-out applies to gets includes
/// them. Positive control: the same store with the list ingested short of
/// that patient counts them.
#[test]
fn the_views_hide_an_ndoo_patient_whose_rows_are_in_the_files() {
    let b = base();
    let ndoo = ndoo_patients();
    let store = copy_of_base();
    let control = copy_of_base();
    let (list, target) = ndoo_list_without_one(&control.store);
    assert!(ndoo.contains(&target));
    assert!(stored(&store.store, "patients").contains(&target));
    assert_views_hide_exactly(&store.store, &ndoo, "NDOO");

    let o = run(&[
        "optout",
        "ingest",
        "--ndoo",
        list.to_str().unwrap(),
        "--store",
        control.store.to_str().unwrap(),
        "--key",
        b.c.key.to_str().unwrap(),
        "--accept-shrink",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut shown = ndoo.clone();
    shown.remove(&target);
    assert_ne!(
        raw_counts(&control.store, "patients", &["sex", "imd_decile"], &shown),
        raw_counts(&control.store, "patients", &["sex", "imd_decile"], &ndoo),
    );
    assert_views_hide_exactly(&control.store, &shown, "NDOO list without the patient");
}
