//! The opt-out lifecycle as a user drives it: `gpdp optout apply` for Type 1
//! opt-outs registered after collection (movers included) — unreachable at
//! once through deletion vectors — and `gpdp optout purge`, which erases
//! them from the bytes; re-applying, re-purging, crashing, withdrawing, and
//! `gpdp audit` against the truth.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;

/// A fresh store: 3 practices, NDOO ingested. Each test gets its own (they
/// change it).
fn setup() -> Collected {
    collected_with_ndoo(3, 1500, 31, 5)
}

/// The practices each patient with no Type 1 code anywhere is registered
/// at, by NHS number, from the extract's truth.
fn practices_of(extract: &Path) -> BTreeMap<String, Vec<String>> {
    let recs = Csv::read(&extract.join("truth/patients.csv")).records();
    let mut practices: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in recs.iter().filter(|r| r["type1_anywhere"] == "false") {
        practices
            .entry(r["nhs_number"].clone())
            .or_default()
            .push(r["practice"].clone());
    }
    practices
}

/// Patients with no Type 1 code anywhere: `movers` registered at two
/// practices, then `others` registered at one.
fn later_opt_outs(extract: &Path, movers: usize, others: usize) -> Vec<String> {
    let practices = practices_of(extract);
    let pick = |moved: bool, n: usize| {
        practices
            .iter()
            .filter(|(_, k)| (k.len() > 1) == moved)
            .map(|(nhs, _)| nhs.clone())
            .take(n)
            .collect::<Vec<_>>()
    };
    let mut out = pick(true, movers);
    assert_eq!(out.len(), movers, "not enough movers in the extract");
    out.extend(pick(false, others));
    out
}

fn write_requests(path: &Path, numbers: &[String], date: &str) {
    let mut text = "nhs_number,requested_at\n".to_owned();
    for n in numbers {
        text += &format!("{n},{date}\n");
    }
    std::fs::write(path, text).unwrap();
}

/// `gpdp optout apply` of `list` on the test's store, ready to run.
fn apply_command(c: &Collected, list: &Path) -> std::process::Command {
    optout_apply(&c.store, &c.key, list)
}

fn apply(c: &Collected, list: &Path, extra: &[&str]) -> std::process::Output {
    apply_command(c, list).args(extra).output().unwrap()
}

fn audit(c: &Collected) -> std::process::Output {
    gpdp().arg("audit").args(c.truth_args()).output().unwrap()
}

/// `gpdp optout purge` on the test's store, ready to run.
fn purge_command(store: &Path) -> std::process::Command {
    let mut cmd = gpdp();
    cmd.args(["optout", "purge", "--store"]).arg(store);
    cmd
}

fn purge(c: &Collected, extra: &[&str]) -> std::process::Output {
    purge_command(&c.store).args(extra).output().unwrap()
}

/// The line of the audit table for `check`.
fn line_of<'a>(out: &'a str, check: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(check))
        .unwrap_or_else(|| panic!("no {check} line in\n{out}"))
}

/// Every pseudonym with a row in any table.
fn stored_patients(store: &Path) -> HashSet<[u8; 32]> {
    ["patients", "clinical_events", "medications"]
        .iter()
        .flat_map(|t| patient_ids(&read_table(store, t)))
        .collect()
}

#[test]
fn later_opt_outs_are_deleted_everywhere_with_proof_and_the_audit_passes() {
    let c = setup();
    let numbers = later_opt_outs(&c.extract, 3, 7);
    let targets: HashSet<[u8; 32]> = numbers.iter().map(|n| pseudonym(5, n)).collect();
    let before = stored_patients(&c.store);
    assert!(targets.iter().all(|t| before.contains(t)));
    // Keep a copy of a file that is about to lose rows (for the tamper check).
    let m = manifest(&c.store);
    let events_before: BTreeMap<String, String> = m["batches"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(p, b)| {
            (
                p.clone(),
                b["files"]["clinical_events"]["path"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    let saved = c._dir.path().join("saved-events.parquet");
    let (practice, old_path) = events_before.iter().next().unwrap();
    std::fs::copy(c.store.join(old_path), &saved).unwrap();

    let list = c._dir.path().join("type1-requests.csv");
    write_requests(&list, &numbers, "2026-04-01");
    let o = apply(&c, &list, &["--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["applied"], 10);
    assert_eq!(report["pending"], 0);
    // Movers are deleted from both practices.
    assert_eq!(report["registrations_deleted"], 13, "{report}");
    assert!(report["latency_max_seconds"].as_f64().unwrap() > 0.0);
    // No data file rewritten: one deletion vector per file that held them.
    assert_eq!(report["files_rewritten"], 0, "{report}");
    assert!(report["files_masked"].as_u64().unwrap() >= 3, "{report}");

    // Unreachable through the store's readers, still in the bytes.
    let reachable = reachable_patients(&c.store);
    assert!(
        reachable.is_disjoint(&targets),
        "a deleted patient is reachable"
    );
    assert_eq!(
        before.len() - reachable.len(),
        targets.len(),
        "others were deleted too"
    );
    assert_eq!(
        stored_patients(&c.store),
        before,
        "apply rewrote a data file"
    );
    assert_eq!(
        manifest(&c.store)["batches"][practice.as_str()]["files"]["clinical_events"]["path"],
        old_path.as_str()
    );

    // The proof is in the audit log, with counts, never numbers.
    let log = std::fs::read_to_string(c.store.join("audit/log.jsonl")).unwrap();
    // The delete entry, then the generation's commit record.
    let lines: Vec<&str> = log.lines().collect();
    let last: serde_json::Value = serde_json::from_str(lines[lines.len() - 2]).unwrap();
    assert_eq!(last["entry"]["event"], "delete");
    let commit: serde_json::Value = serde_json::from_str(lines[lines.len() - 1]).unwrap();
    assert_eq!(commit["entry"]["event"], "commit");
    assert_eq!(commit["entry"]["generation"], last["entry"]["generation"]);
    assert_eq!(last["entry"]["reason"], "type1_request");
    assert_eq!(last["entry"]["erasure"], "deletion_vectors");
    let m = manifest(&c.store);
    for p in last["entry"]["proof"].as_array().unwrap() {
        let batch = &m["batches"][p["practice"].as_str().unwrap()];
        let table = p["table"].as_str().unwrap();
        assert!(p["rows_masked"].as_u64().unwrap() > 0);
        // Bound to the data file in force, and the vector in force.
        assert_eq!(p["sha256"], batch["files"][table]["sha256"]);
        assert_eq!(p["vector_sha256"], batch["vectors"][table]["sha256"]);
        assert_eq!(p["rows_masked_total"], batch["vectors"][table]["rows"]);
    }
    assert!(numbers.iter().all(|n| !log.contains(n.as_str())));

    // The requests are older than the purge deadline (30 days): the audit
    // sees them unreachable but still in the bytes, and fails that alone.
    let o = audit(&c);
    assert_eq!(o.status.code(), Some(3), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(
        line_of(&out, "tombstoned_patients_unreachable").contains("pass"),
        "{out}"
    );
    assert!(
        line_of(&out, "tombstoned_patients_absent").contains("FAIL"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.contains(" FAIL ")).count(),
        1,
        "{out}"
    );

    // The purge erases them: every file with a vector rewritten, no vector left.
    let o = purge(&c, &["--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["files_rewritten"], report["files_masked"], "{r}");
    assert_eq!(r["patients_erased"], 10, "{r}");
    assert!(r["latency_erased_max_seconds"].as_f64().unwrap() > 0.0);
    let after = stored_patients(&c.store);
    assert!(
        after.is_disjoint(&targets),
        "a purged patient is still in the bytes"
    );
    assert_eq!(after, reachable);
    let m = manifest(&c.store);
    assert!(
        m["batches"]
            .as_object()
            .unwrap()
            .values()
            .all(|b| b.get("vectors").is_none()),
        "{m}"
    );
    let log = std::fs::read_to_string(c.store.join("audit/log.jsonl")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let last: serde_json::Value = serde_json::from_str(lines[lines.len() - 2]).unwrap();
    assert_eq!(last["entry"]["event"], "purge");
    for p in last["entry"]["proof"].as_array().unwrap() {
        assert!(p["rows_after"].as_u64() < p["rows_before"].as_u64());
        assert_ne!(p["sha256_before"], p["sha256_after"]);
        assert!(p["vector_sha256_before"].is_string());
    }

    let o = audit(&c);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("every check passed"));

    // Purging again rewrites nothing.
    let generation = manifest(&c.store)["generation"].clone();
    let o = purge(&c, &["--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        (r["unchanged"].clone(), r["files_rewritten"].clone()),
        (true.into(), 0.into())
    );
    assert_eq!(manifest(&c.store)["generation"], generation);

    // Re-applying changes nothing.
    let generation = manifest(&c.store)["generation"].clone();
    let o = apply(&c, &list, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("already applied"), "{}", stdout(&o));
    assert_eq!(manifest(&c.store)["generation"], generation);

    // Undo the deletion by hand: put the old events file back under the purged one's name.
    let m = manifest(&c.store);
    let new_path = m["batches"][practice.as_str()]["files"]["clinical_events"]["path"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(&new_path, old_path, "the file was not rewritten");
    std::fs::copy(&saved, c.store.join(&new_path)).unwrap();
    let o = audit(&c);
    assert_eq!(o.status.code(), Some(3), "{}", stdout(&o));
    let out = stdout(&o);
    for check in [
        "files_match_manifest",
        "tombstoned_patients_unreachable",
        "tombstoned_patients_absent",
    ] {
        let line = out.lines().find(|l| l.starts_with(check)).unwrap();
        assert!(line.contains("FAIL"), "{line}");
    }
    assert!(
        stderr(&o).contains("tombstoned_patients_absent"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn invalid_requests_change_nothing_unless_skipped_and_then_stay_pending() {
    let c = setup();
    let mut numbers = later_opt_outs(&c.extract, 1, 2);
    numbers.push("1234567890".into());
    let list = c._dir.path().join("requests.csv");
    write_requests(&list, &numbers, "2026-04-01");
    let generation = manifest(&c.store)["generation"].clone();
    let o = apply(&c, &list, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("line 5: invalid_nhs_number"),
        "{}",
        stderr(&o)
    );
    assert_eq!(manifest(&c.store)["generation"], generation);

    let o = apply(&c, &list, &["--skip-invalid", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        (
            r["requests"].as_u64(),
            r["applied"].as_u64(),
            r["pending"].as_u64()
        ),
        (Some(4), Some(3), Some(1))
    );

    // A date in the future, or not a date, is invalid too.
    write_requests(&list, &numbers[..1], "2999-01-01");
    let o = apply(&c, &list, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("invalid_requested_at"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_crash_during_apply_or_purge_leaves_no_half_deleted_state_and_a_rerun_completes() {
    let c = setup();
    let numbers = later_opt_outs(&c.extract, 2, 4);
    let list = c._dir.path().join("requests.csv");
    for (failpoint, group) in ["before-manifest-swap", "after-manifest-swap"]
        .into_iter()
        .zip(numbers.chunks(3))
    {
        let targets: HashSet<[u8; 32]> = group.iter().map(|n| pseudonym(5, n)).collect();
        write_requests(&list, group, "2026-04-01");
        let before = reachable_patients(&c.store);
        let manifest_before = std::fs::read(c.store.join("manifest.json")).unwrap();
        let o = apply_command(&c, &list)
            .env("GPDP_FAILPOINT", failpoint)
            .output()
            .unwrap();
        assert!(
            !o.status.success(),
            "the failpoint {failpoint} did not fire"
        );
        let now = reachable_patients(&c.store);
        if failpoint == "before-manifest-swap" {
            // Nothing visible changed.
            assert_eq!(
                std::fs::read(c.store.join("manifest.json")).unwrap(),
                manifest_before
            );
            assert_eq!(now, before);
        } else {
            // All of it is visible: never some of it.
            assert!(now.is_disjoint(&targets));
        }
        // Re-running completes (or finds it complete).
        let o = apply(&c, &list, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(reachable_patients(&c.store).is_disjoint(&targets));
        assert!(targets.is_subset(&stored_patients(&c.store)));

        // The purge, crashed at the same point.
        let manifest_before = std::fs::read(c.store.join("manifest.json")).unwrap();
        let o = purge_command(&c.store)
            .env("GPDP_FAILPOINT", failpoint)
            .output()
            .unwrap();
        assert!(
            !o.status.success(),
            "the failpoint {failpoint} did not fire in purge"
        );
        let stored = stored_patients(&c.store);
        if failpoint == "before-manifest-swap" {
            assert_eq!(
                std::fs::read(c.store.join("manifest.json")).unwrap(),
                manifest_before
            );
            assert!(targets.is_subset(&stored), "erased before the commit");
        } else {
            assert!(
                stored.is_disjoint(&targets),
                "some rows left after the commit"
            );
        }
        assert!(reachable_patients(&c.store).is_disjoint(&targets));
        let o = purge(&c, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stored_patients(&c.store).is_disjoint(&targets));
        let o = audit(&c);
        assert!(
            o.status.success(),
            "after {failpoint}: {}{}",
            stdout(&o),
            stderr(&o)
        );
    }
}

/// A patient whose later opt-out was applied comes back when their practice
/// records the opt-out withdrawn (on or after the request's date) and is
/// collected again; a withdrawal dated before the request does not count.
#[test]
fn a_withdrawal_recorded_after_the_request_brings_the_patient_back() {
    let c = setup();
    let numbers = later_opt_outs(&c.extract, 0, 2);
    let list = c._dir.path().join("requests.csv");
    write_requests(&list, &numbers, "2026-02-01");
    assert!(apply(&c, &list, &[]).status.success());
    let recs = Csv::read(&c.extract.join("truth/patients.csv")).records();
    let practice_of =
        |n: &str| recs.iter().find(|r| r["nhs_number"] == n).unwrap()["practice"].clone();
    // The first withdraws after the request; the second "withdrew" before it.
    for (n, date) in [(&numbers[0], "2026-03-01"), (&numbers[1], "2026-01-15")] {
        let events = c
            .extract
            .join(format!("practices/{}/clinical_events.csv", practice_of(n)));
        let mut text = std::fs::read_to_string(&events).unwrap();
        text += &format!("{n},{date},827261000000102,,\n");
        std::fs::write(&events, text).unwrap();
    }
    // The opt-outs left deletion vectors in their practices' batches.
    let vectors: Vec<String> = manifest(&c.store)["batches"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|b| b["vectors"].as_object().into_iter().flatten())
        .map(|(_, v)| v["path"].as_str().unwrap().to_owned())
        .collect();
    assert!(!vectors.is_empty());
    let o = collect(&c.extract, &c.store, &c.key);
    assert!(o.status.success(), "{}", stderr(&o));
    // Re-collecting those batches dropped the vectors with the old files.
    let m = manifest(&c.store);
    assert!(
        m["batches"]
            .as_object()
            .unwrap()
            .values()
            .all(|b| b.get("vectors").is_none()),
        "{m}"
    );
    for v in &vectors {
        assert!(!c.store.join(v).exists(), "{v} left behind");
    }
    let now = stored_patients(&c.store);
    assert!(
        now.contains(&pseudonym(5, &numbers[0])),
        "the withdrawn opt-out was not lifted"
    );
    assert!(
        !now.contains(&pseudonym(5, &numbers[1])),
        "a withdrawal before the request lifted it"
    );
    let o = audit(&c);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}

/// SIGKILL at spread-out moments: after every kill the patients are either
/// all still there or all gone (never some of them), every referenced file
/// exists, and a final run completes the deletion. Each kill's landing is
/// recorded — still running or already finished, and what it left on disk
/// — and at least half must land inside a run with a deletion to do, one
/// at least while it wrote files: the kill moments are spread over an
/// uninterrupted run's duration, timed here on a copy, and once a kill
/// lets the deletion finish the store starts again from its copy
/// (re-applying a finished deletion is a no-op).
#[test]
fn killing_apply_at_any_moment_never_shows_a_half_deletion() {
    let (c, targets, list) = kill_setup();
    // Apply's deletion: the patients unreachable.
    kill_during(
        &c,
        &targets,
        &|store| optout_apply(store, &c.key, &list),
        &|store| reachable_patients(store),
    );
    let o = apply(&c, &list, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(reachable_patients(&c.store).is_disjoint(&targets));
    let o = purge(&c, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = audit(&c);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}

/// The same for `gpdp optout purge` after the apply: the patients' rows
/// are all in the bytes or all erased, and never reachable meanwhile.
#[test]
fn killing_purge_at_any_moment_never_shows_a_half_erasure() {
    let (c, targets, list) = kill_setup();
    let o = apply(&c, &list, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    kill_during(&c, &targets, &purge_command, &|store| {
        assert!(
            reachable_patients(store).is_disjoint(&targets),
            "a purge made a patient reachable again"
        );
        stored_patients(store)
    });
    let o = purge(&c, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stored_patients(&c.store).is_disjoint(&targets));
    let o = audit(&c);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}

/// The kill tests' store and deletion: 5 movers and 45 others opted out
/// on 1 April 2026, their pseudonyms, and the requests list.
fn kill_setup() -> (Collected, HashSet<[u8; 32]>, PathBuf) {
    let c = setup();
    let numbers = later_opt_outs(&c.extract, 5, 45);
    let targets: HashSet<[u8; 32]> = numbers.iter().map(|n| pseudonym(5, n)).collect();
    let list = c._dir.path().join("requests.csv");
    write_requests(&list, &numbers, "2026-04-01");
    (c, targets, list)
}

/// Twelve runs of `command` on the test's store, each killed at a moment
/// spread over an uninterrupted run; `seen` is the set of patients the
/// deletion is judged by (reachable, or in the bytes).
fn kill_during(
    c: &Collected,
    targets: &HashSet<[u8; 32]>,
    command: &dyn Fn(&Path) -> std::process::Command,
    seen: &dyn Fn(&Path) -> HashSet<[u8; 32]>,
) {
    let pristine = c._dir.path().join("pristine");
    copy_dir(&c.store, &pristine);
    // The shorter of two uninterrupted runs, each on a copy.
    let mut run_time = Duration::MAX;
    for _ in 0..2 {
        let timed = c._dir.path().join("timed");
        copy_dir(&c.store, &timed);
        let started = Instant::now();
        let o = command(&timed).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        run_time = run_time.min(started.elapsed());
    }

    let mut landings = Vec::new();
    for i in 0..12u32 {
        if targets.is_disjoint(&seen(&c.store)) {
            copy_dir(&pristine, &c.store);
        }
        let pending = targets.is_subset(&seen(&c.store));
        let staged_before = unreferenced_files(&c.store);
        // From the start of a run to a little past its end.
        let at = run_time.mul_f64((f64::from(i % 6) + 0.5) * 1.2 / 6.0);
        let mut cmd = command(&c.store);
        cmd.stdout(std::process::Stdio::null());
        let (killed, took) = kill_at(&mut cmd, at);
        let now = seen(&c.store);
        let left = targets.intersection(&now).count();
        assert!(
            left == 0 || left == targets.len(),
            "a half-applied deletion is visible: {left} of {} left",
            targets.len()
        );
        let m = manifest(&c.store);
        for batch in m["batches"].as_object().unwrap().values() {
            let vectors = batch["vectors"].as_object().into_iter().flatten();
            for (_, file) in batch["files"].as_object().unwrap().iter().chain(vectors) {
                assert!(c.store.join(file["path"].as_str().unwrap()).exists());
            }
        }
        landings.push(Landing {
            at,
            killed,
            pending,
            deleted: left == 0,
            staged: unreferenced_files(&c.store)
                .difference(&staged_before)
                .count(),
        });
        if !killed && pending {
            // A whole run, timed: aim the next kills inside one.
            run_time = took;
        }
    }
    let report: Vec<String> = landings.iter().map(Landing::to_string).collect();
    // Shown with --nocapture: where each kill landed.
    eprintln!("{}", report.join("\n"));
    let inside = landings.iter().filter(|l| l.inside()).count();
    let writing = landings
        .iter()
        .filter(|l| l.inside() && l.staged > 0)
        .count();
    assert!(
        inside >= landings.len() / 2 && writing >= 1,
        "too few kills landed inside a run ({inside} of {}, {writing} while it wrote):\n{}",
        landings.len(),
        report.join("\n")
    );
}

/// Where one SIGKILL of `gpdp optout apply` or `purge` landed.
struct Landing {
    at: Duration,
    /// The process was still running when the signal came.
    killed: bool,
    /// The deletion was still to do when the run started.
    pending: bool,
    /// The deletion was visible (committed) afterwards.
    deleted: bool,
    /// Files the killed run had written and not yet committed.
    staged: usize,
}

impl Landing {
    /// Inside a run with the deletion to do.
    fn inside(&self) -> bool {
        self.killed && self.pending
    }
}

impl std::fmt::Display for Landing {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "kill at {:>4} ms: {}, deletion {}, {} staged files left",
            self.at.as_millis(),
            match (self.killed, self.pending) {
                (true, true) => "inside the run",
                (true, false) => "inside a run with nothing to do",
                (false, _) => "after it ended",
            },
            if self.deleted {
                "committed"
            } else {
                "not visible"
            },
            self.staged
        )
    }
}

/// Runs `cmd` and sends it SIGKILL once `at` has passed, unless it has
/// finished (successfully) before: whether the signal landed inside the
/// run, and how long the run lasted.
fn kill_at(cmd: &mut std::process::Command, at: Duration) -> (bool, Duration) {
    use std::os::unix::process::ExitStatusExt;
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();
    while started.elapsed() < at {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the run failed on its own: {status}");
            return (false, started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    (status.signal() == Some(9), started.elapsed())
}

/// Files under `tables/` and `optouts/` that the manifest does not
/// reference: a killed run's staged work (the next writer removes them).
fn unreferenced_files(store: &Path) -> HashSet<String> {
    let m = manifest(store);
    let mut referenced: HashSet<String> = m["batches"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|b| {
            let vectors = b["vectors"]
                .as_object()
                .into_iter()
                .flat_map(|v| v.values());
            b["files"].as_object().unwrap().values().chain(vectors)
        })
        .chain(
            m["linked"]
                .as_object()
                .into_iter()
                .flat_map(|l| l.values())
                .map(|l| &l["file"]),
        )
        .chain([&m["tombstones"], &m["ndoo"]])
        .filter_map(|f| f["path"].as_str().map(str::to_owned))
        .collect();
    // The links to the current opt-out lists.
    referenced.extend([
        "optouts/tombstones.parquet".into(),
        "optouts/ndoo.parquet".into(),
    ]);
    ["tables", "optouts"]
        .iter()
        .flat_map(|d| {
            tree(&store.join(d))
                .into_keys()
                .map(move |p| Path::new(d).join(p))
        })
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| !referenced.contains(p))
        .collect()
}

/// `cp -a`, replacing `to`: the store holds symlinks.
fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let o = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `gpdp report --json` figures of the test's store.
fn report_figures(c: &Collected, name: &str) -> serde_json::Value {
    let out = c._dir.path().join(name);
    let o = report(c, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap()
}

/// Per patient, through every reader outside the TRE: after `apply` the
/// patient is unreachable — `optout status`, the audit and the report
/// (collection rows, re-identification risk, linkage) read what they read
/// after the purge — while their rows are still in the bytes; the same
/// list again is a no-op; after `purge` the bytes hold none of them.
#[test]
fn after_apply_every_reader_sees_what_it_sees_after_the_purge() {
    let c = setup();
    // A link of provider data (the report's linkage section reads the GP
    // patients beside it).
    let o = link(&c, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let numbers = later_opt_outs(&c.extract, 2, 3);
    let targets: HashSet<[u8; 32]> = numbers.iter().map(|n| pseudonym(5, n)).collect();
    let list = c._dir.path().join("requests.csv");
    // Requested now: within the purge deadline, so the audit passes.
    write_requests(&list, &numbers, "");
    let stored_rows: u64 = {
        let m = manifest(&c.store);
        m["batches"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|b| b["files"].as_object().unwrap().values())
            .map(|f| f["rows"].as_u64().unwrap())
            .sum()
    };
    let o = apply(&c, &list, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("no data file rewritten"),
        "{}",
        stdout(&o)
    );
    assert!(
        targets.is_subset(&stored_patients(&c.store)),
        "apply erased bytes"
    );
    assert!(reachable_patients(&c.store).is_disjoint(&targets));

    // The same list again: nothing to do (a masked patient is not held).
    let generation = manifest(&c.store)["generation"].clone();
    let o = apply(&c, &list, &["--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        (r["unchanged"].clone(), r["files_masked"].clone()),
        (true.into(), 0.into()),
        "{r}"
    );
    assert_eq!(manifest(&c.store)["generation"], generation);

    // (Their hospital records, linked, stay: Type 1 covers GP data only.)
    let gp = ["patients", "clinical_events", "medications"];
    for n in &numbers {
        let s = optout_status(&c, n);
        assert!(gp.iter().all(|t| s["rows"][t] == 0), "{s}");
        assert!(
            s["rows_awaiting_purge"]
                .as_object()
                .unwrap()
                .values()
                .any(|v| v.as_u64() > Some(0)),
            "{s}"
        );
        // No project's GP views include them.
        assert!(
            s["projects"].as_array().unwrap().iter().all(|p| {
                let because = p["because"].as_str().unwrap();
                !gp.iter().any(|t| because.contains(&format!("{t} (")))
            }),
            "{s}"
        );
    }
    let o = audit(&c);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let masked = report_figures(&c, "report-masked");

    let o = purge(&c, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("request to erased"), "{}", stdout(&o));
    assert!(stored_patients(&c.store).is_disjoint(&targets));
    for n in &numbers {
        let s = optout_status(&c, n);
        assert!(gp.iter().all(|t| s["rows"][t] == 0), "{s}");
        assert!(s.get("rows_awaiting_purge").is_none(), "{s}");
    }
    let o = audit(&c);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let purged = report_figures(&c, "report-purged");

    let masked_rows = masked["collection"]["rows_masked_awaiting_purge"]
        .as_u64()
        .unwrap();
    assert!(masked_rows > 0);
    assert_eq!(
        masked["collection"]["rows_out"].as_u64().unwrap() + masked_rows,
        stored_rows
    );
    assert_eq!(purged["collection"]["rows_masked_awaiting_purge"], 0);
    for section in ["reidentification", "linkage", "representativeness"] {
        assert!(!masked[section].is_null(), "{section}");
        assert_eq!(masked[section], purged[section], "{section}");
    }
    assert_eq!(
        masked["collection"]["rows_out"],
        purged["collection"]["rows_out"]
    );
    let later = |r: &serde_json::Value, k: &str| r["optouts"]["later"][k].clone();
    assert_eq!(later(&masked, "patients_deleted"), 5);
    assert_eq!(later(&masked, "patients_erased"), 0);
    assert!(later(&masked, "latency_erased_max_seconds").is_null());
    assert_eq!(later(&purged, "patients_erased"), 5);
    assert_eq!(later(&purged, "purges"), 1);
    assert!(
        later(&purged, "latency_erased_max_seconds")
            .as_f64()
            .is_some()
    );
}

/// Fail closed: a deletion vector whose bytes are not what the manifest
/// recorded refuses its file in every reader — exit status 3 and the
/// vector named — and is never read as if there were none.
/// A later opt-out whose rows sit in a file that already carries a
/// deletion vector gets a new vector, the union of the old one and its
/// rows: the second list's patients are as unreachable as the first's,
/// and no earlier patient comes back.
#[test]
fn a_second_list_masks_its_patients_in_files_that_already_have_vectors() {
    let c = setup();
    let numbers = later_opt_outs(&c.extract, 0, 40);
    let (first, second) = numbers.split_at(20);
    let pseudonyms =
        |ns: &[String]| -> HashSet<[u8; 32]> { ns.iter().map(|n| pseudonym(5, n)).collect() };
    for (name, list) in [("first.csv", first), ("second.csv", second)] {
        let path = c._dir.path().join(name);
        write_requests(&path, list, "");
        let before = manifest(&c.store);
        let o = apply(&c, &path, &["--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert!(r["files_masked"].as_u64().unwrap() > 0, "{name}: {r}");
        let after = manifest(&c.store);
        // Every vector in force grew by what this run masked in its file.
        let log = std::fs::read_to_string(c.store.join("audit/log.jsonl")).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        let entry: serde_json::Value = serde_json::from_str(lines[lines.len() - 2]).unwrap();
        let mut grown = 0;
        for p in entry["entry"]["proof"].as_array().unwrap() {
            let (practice, table) = (
                p["practice"].as_str().unwrap(),
                p["table"].as_str().unwrap(),
            );
            let old = before["batches"][practice]["vectors"][table]["rows"]
                .as_u64()
                .unwrap_or(0);
            let new = after["batches"][practice]["vectors"][table]["rows"]
                .as_u64()
                .unwrap();
            assert_eq!(
                new,
                old + p["rows_masked"].as_u64().unwrap(),
                "{name}: {practice} {table}"
            );
            grown += usize::from(old > 0);
        }
        if name == "second.csv" {
            assert!(grown > 0, "no file of the second list had a vector already");
        }
    }
    let reachable = reachable_patients(&c.store);
    assert!(
        reachable.is_disjoint(&pseudonyms(first)),
        "a first-list patient came back"
    );
    assert!(
        reachable.is_disjoint(&pseudonyms(second)),
        "a second-list patient is reachable"
    );
}

/// `gpdp optout purge --min-deleted-share F` rewrites exactly the files
/// whose vector masks at least that share of their rows, and keeps the
/// others' vectors in force; a purge without it then rewrites the rest.
#[test]
fn a_purge_with_a_minimum_share_rewrites_only_the_files_past_it() {
    let c = setup();
    let numbers = later_opt_outs(&c.extract, 2, 30);
    let list = c._dir.path().join("requests.csv");
    write_requests(&list, &numbers, "");
    let o = apply(&c, &list, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Each vector's share of its file's rows, as the manifest records them.
    let shares = |m: &serde_json::Value| -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for (practice, b) in m["batches"].as_object().unwrap() {
            // (A batch with no vector leaves the field out.)
            for (table, v) in b["vectors"].as_object().into_iter().flatten() {
                let rows = b["files"][table]["rows"].as_f64().unwrap();
                out.push((
                    format!("{practice}/{table}"),
                    v["rows"].as_f64().unwrap() / rows,
                ));
            }
        }
        out
    };
    let before = shares(&manifest(&c.store));
    let mut sorted: Vec<f64> = before.iter().map(|(_, s)| *s).collect();
    sorted.sort_by(f64::total_cmp);
    // A threshold between two shares, so some files pass it and some not.
    let at = sorted.len() / 2;
    assert!(sorted[at - 1] < sorted[at], "shares too alike: {sorted:?}");
    let threshold = (sorted[at - 1] + sorted[at]) / 2.0;
    let passing = before.iter().filter(|(_, s)| *s >= threshold).count();
    let o = purge(
        &c,
        &["--min-deleted-share", &threshold.to_string(), "--json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["files_rewritten"], passing, "{r}");
    assert_eq!(r["vectors_kept"], before.len() - passing, "{r}");
    let kept = shares(&manifest(&c.store));
    assert!(
        !kept.is_empty() && kept.iter().all(|(_, s)| *s < threshold),
        "{kept:?}"
    );
    // Masked patients stay unreachable whichever file holds their rows.
    let targets: HashSet<[u8; 32]> = numbers.iter().map(|n| pseudonym(5, n)).collect();
    assert!(reachable_patients(&c.store).is_disjoint(&targets));
    assert!(
        !stored_patients(&c.store).is_disjoint(&targets),
        "all erased already"
    );
    let o = purge(&c, &["--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["files_rewritten"], before.len() - passing, "{r}");
    assert!(shares(&manifest(&c.store)).is_empty());
    assert!(stored_patients(&c.store).is_disjoint(&targets));
}

#[test]
fn a_reader_given_a_vector_whose_checksum_does_not_match_refuses_the_file() {
    let c = setup();
    let numbers = later_opt_outs(&c.extract, 1, 2);
    let list = c._dir.path().join("requests.csv");
    write_requests(&list, &numbers, "");
    assert!(apply(&c, &list, &[]).status.success());
    let m = manifest(&c.store);
    let vector = m["batches"]
        .as_object()
        .unwrap()
        .values()
        .find_map(|b| b["vectors"]["patients"]["path"].as_str())
        .unwrap()
        .to_owned();
    // One position moved by one row: a valid vector, for the wrong rows.
    let path = c.store.join(&vector);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 8;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();

    let refused = |o: std::process::Output, what: &str| {
        assert_eq!(
            o.status.code(),
            Some(3),
            "{what}: {}{}",
            stdout(&o),
            stderr(&o)
        );
        assert!(stderr(&o).contains(&vector), "{what}: {}", stderr(&o));
    };
    refused(
        run(&[
            "optout",
            "status",
            "--nhs-number",
            &numbers[0],
            "--store",
            c.store.to_str().unwrap(),
            "--key",
            c.key.to_str().unwrap(),
        ]),
        "optout status",
    );
    refused(purge(&c, &[]), "optout purge");
    let more = later_opt_outs(&c.extract, 0, 5);
    write_requests(&list, &more[3..], "");
    refused(apply(&c, &list, &[]), "optout apply");
    let out = c._dir.path().join("report");
    refused(report(&c, &out, &[]), "report");
    let o = audit(&c);
    assert_eq!(o.status.code(), Some(3));
    let line = line_of(&stdout(&o), "files_match_manifest").to_owned();
    assert!(line.contains("FAIL") && line.contains(&vector), "{line}");
    // The store's own reader, as a library, refuses it too.
    let store = gpdp::store::read_manifest(&c.store).unwrap();
    let batch = store
        .batches
        .values()
        .find(|b| b.vectors.get("patients").is_some_and(|v| v.path == vector))
        .unwrap();
    let e = gpdp::store::parquet::open(&c.store, batch, "patients").unwrap_err();
    assert!(e.to_string().contains(&vector), "{e}");
}

/// Rewrites keep masked rows out. A collection deleting a Type 1 mover
/// from another practice's batch rewrites that batch's files, which carry
/// a later opt-out's vectors: the new files hold neither patient and need
/// no vector. And `Deleter::rewrite` of a file with a vector drops its
/// masked rows.
#[test]
fn a_rewrite_of_a_file_with_a_vector_keeps_the_masked_rows_out() {
    let c = setup();
    let practices = practices_of(&c.extract);
    let (mover, at) = practices.iter().find(|(_, p)| p.len() == 2).unwrap();
    let (dissent_at, other) = (at[0].clone(), at[1].clone());
    let masked = practices
        .iter()
        .find(|(n, p)| *n != mover && p.len() == 1 && p[0] == other)
        .unwrap()
        .0
        .clone();
    let list = c._dir.path().join("requests.csv");
    write_requests(&list, std::slice::from_ref(&masked), "");
    assert!(apply(&c, &list, &[]).status.success());
    let m = manifest(&c.store);
    assert!(
        m["batches"][&other]["vectors"]["patients"].is_object(),
        "{m}"
    );

    // Deleter::rewrite, as the library's callers use it.
    {
        let store = gpdp::store::Store::open_for_write(&c.store, false).unwrap();
        let file = store.manifest.batches[&other].files["patients"]
            .path
            .clone();
        let mut deleter = gpdp::store::delete::Deleter::new(&store, gpdp::policy::Codec::Zstd(1));
        let (new, rw) = deleter
            .rewrite(&file, "patients", &std::collections::HashSet::new())
            .unwrap();
        assert!(rw.rows_masked > 0 && rw.rows_after == rw.rows_before - rw.rows_masked);
        let ids: HashSet<[u8; 32]> = patient_ids(&read_parquet(&store.path(&new)))
            .into_iter()
            .collect();
        assert!(
            !ids.contains(&pseudonym(5, &masked)),
            "a rewrite resurrected a masked patient"
        );
    }

    // The mover dissents at one practice: collection deletes them from the other's batch.
    let events = c
        .extract
        .join(format!("practices/{dissent_at}/clinical_events.csv"));
    let mut text = std::fs::read_to_string(&events).unwrap();
    text += &format!("{mover},2026-06-01,827241000000103,,\n");
    std::fs::write(&events, text).unwrap();
    let o = collect(&c.extract, &c.store, &c.key);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = manifest(&c.store);
    assert!(m["batches"][&other].get("vectors").is_none(), "{m}");
    let stored = stored_patients(&c.store);
    assert!(!stored.contains(&pseudonym(5, mover)));
    assert!(
        !stored.contains(&pseudonym(5, &masked)),
        "the rewrite brought a masked patient back into the bytes"
    );
    let log = std::fs::read_to_string(c.store.join("audit/log.jsonl")).unwrap();
    let delete: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["entry"].clone())
        .rfind(|e| e["event"] == "delete" && e["reason"] == "type1_dissent")
        .unwrap();
    assert!(
        delete["proof"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["practice"] == other.as_str() && p["vector_sha256_before"].is_string()),
        "{delete}"
    );
    // The masked patient's last masked rows went with the rewrite: erased,
    // in the same commit, with their request → erased latency.
    let erased: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["entry"].clone())
        .rfind(|e| e["event"] == "purge")
        .unwrap_or_else(|| panic!("no purge entry by collect in the log"));
    assert_eq!(erased["by"], "collect", "{erased}");
    assert_eq!(erased["generation"], delete["generation"], "{erased}");
    assert_eq!(erased["patients_erased"], 1, "{erased}");
    assert!(erased["latency_erased_max_seconds"].as_f64().is_some());
    // Without the truth: the extract was edited, the truth was not.
    let o = run(&["audit", "--store", c.store.to_str().unwrap()]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}

/// A mover who dissents at one practice while both their practices are
/// collected again in the same run is withheld at source by both new
/// batches: no batch that stays holds them, so the run deletes from none
/// (no `delete` entry; the old batches go out of force whole), and the
/// audit passes.
#[test]
fn a_dissent_found_while_both_practices_are_collected_again_deletes_from_no_batch() {
    let c = setup();
    let practices = practices_of(&c.extract);
    let (mover, at) = practices.iter().find(|(_, p)| p.len() == 2).unwrap();
    let batch_of = |practice: &str| manifest(&c.store)["batches"][practice]["batch"].clone();
    let before: Vec<_> = at.iter().map(|p| batch_of(p)).collect();
    let logged_before = log_events(&c.store).len();
    // The dissent at one practice; at the other, one event row more (its
    // first, again), so that both are collected again.
    let events = |p: &str| c.extract.join(format!("practices/{p}/clinical_events.csv"));
    let mut text = std::fs::read_to_string(events(&at[0])).unwrap();
    text += &format!("{mover},2026-06-01,827241000000103,,\n");
    std::fs::write(events(&at[0]), text).unwrap();
    let text = std::fs::read_to_string(events(&at[1])).unwrap();
    let first = text.lines().nth(1).unwrap().to_owned();
    std::fs::write(events(&at[1]), format!("{text}{first}\n")).unwrap();

    let o = collect(&c.extract, &c.store, &c.key);
    assert!(o.status.success(), "{}", stderr(&o));
    for (p, old) in at.iter().zip(&before) {
        assert_ne!(&batch_of(p), old, "{p} was not collected again");
    }
    assert!(!stored_patients(&c.store).contains(&pseudonym(5, mover)));
    let new = &log_events(&c.store)[logged_before..];
    assert!(
        new.iter().all(|e| e["event"] != "delete"),
        "a deletion from a batch this run replaced: {new:?}"
    );
    let o = run(&["audit", "--store", c.store.to_str().unwrap()]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}

/// Collection erases masked rows without a purge: collecting a practice
/// again takes its old batch's files, vectors and all, out of force. That
/// commit logs a `purge` entry `"by": "collect"` with the patients left with
/// no masked row anywhere and their request → erased latency, and the
/// report counts them as erased, not awaiting the purge; a mover still
/// masked at their other practice waits for the purge.
#[test]
fn collecting_a_practice_again_erases_its_masked_patients_and_logs_them() {
    let c = setup();
    let practices = practices_of(&c.extract);
    // A mover (masked at two practices) and a patient of only one of them.
    let (mover, at) = practices.iter().find(|(_, p)| p.len() == 2).unwrap();
    let again = at[0].clone();
    let single = practices
        .iter()
        .find(|(n, p)| *n != mover && p.len() == 1 && p[0] == again)
        .unwrap()
        .0
        .clone();
    let list = c._dir.path().join("requests.csv");
    write_requests(&list, &[mover.clone(), single.clone()], "");
    assert!(apply(&c, &list, &[]).status.success());
    assert!(manifest(&c.store)["batches"][&again]["vectors"].is_object());

    // The practice's extract changes (a row of another patient twice): collected again.
    let events = c
        .extract
        .join(format!("practices/{again}/clinical_events.csv"));
    let text = std::fs::read_to_string(&events).unwrap();
    let row = text
        .lines()
        .skip(1)
        .find(|l| !l.starts_with(mover.as_str()) && !l.starts_with(single.as_str()))
        .unwrap()
        .to_owned();
    std::fs::write(&events, format!("{text}{row}\n")).unwrap();
    let o = collect(&c.extract, &c.store, &c.key);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = manifest(&c.store);
    assert!(m["batches"][&again].get("vectors").is_none(), "{m}");
    assert!(
        m["batches"][&at[1]]["vectors"].is_object(),
        "the mover's other practice keeps its vectors"
    );
    let stored = stored_patients(&c.store);
    assert!(!stored.contains(&pseudonym(5, &single)));
    assert!(
        stored.contains(&pseudonym(5, mover)),
        "still in the bytes at the other practice"
    );

    let r = report_figures(&c, "report-collected");
    let later = |r: &serde_json::Value, k: &str| r["optouts"]["later"][k].clone();
    assert_eq!(later(&r, "patients_deleted"), 2);
    assert_eq!(later(&r, "patients_erased"), 1, "{}", r["optouts"]);
    assert_eq!(later(&r, "purges"), 0);
    assert!(later(&r, "latency_erased_max_seconds").as_f64().is_some());

    let log: Vec<serde_json::Value> = std::fs::read_to_string(c.store.join("audit/log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["entry"].clone())
        .collect();
    let collected = log
        .iter()
        .rfind(|e| e["event"] == "collect" && e["practice"] == again.as_str())
        .unwrap();
    let erased = log
        .iter()
        .rfind(|e| e["event"] == "purge")
        .unwrap_or_else(|| panic!("no purge entry by collect in the log"));
    assert_eq!(erased["by"], "collect", "{erased}");
    assert_eq!(erased["reason"], "type1_request");
    assert_eq!(
        erased["generation"], collected["generation"],
        "logged in the commit that erased them"
    );
    assert_eq!(erased["patients_erased"], 1, "{erased}");
    assert!(
        erased["rows_erased"]["patients"].as_u64().unwrap() >= 2,
        "{erased}"
    );
    assert!(erased["latency_erased_max_seconds"].as_f64().unwrap() >= 0.0);
    assert!(
        erased["proof"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["practice"] == again.as_str())
    );

    let s = optout_status(&c, &single);
    assert_eq!(s["in_store"], false, "{s}");
    assert!(s.get("rows_awaiting_purge").is_none(), "{s}");
    let o = audit(&c);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(
        line_of(&stdout(&o), "tombstoned_patients_absent").contains("pass"),
        "{}",
        stdout(&o)
    );

    // The purge erases the mover: two erased in all, one purge run.
    let o = purge(&c, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = report_figures(&c, "report-purged");
    assert_eq!(later(&r, "patients_erased"), 2, "{}", r["optouts"]);
    assert_eq!(later(&r, "purges"), 1);
    let o = audit(&c);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}
