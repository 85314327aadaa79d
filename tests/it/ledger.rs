//! A ledger and keys nobody can quietly reset. A researcher's spend is
//! what the audit log's charges add up to, read from the log itself on
//! every charge, and `gpdp audit` replays every charge and fails on any
//! that passed its budget or recorded a spend the log had not reached.
//! A store's cell-key answers are bound to one perturbation key, recorded
//! in the log on first use: another key is refused, and changing it is a
//! deliberate, logged rotation.
//!
//! Before, the ledger was read from a cache beside the log: setting a
//! researcher's spend to 0 there gave her a fresh budget over the same people,
//! and `gpdp audit --verify-log` still passed while the log recorded more
//! ρ than her budget. And any key from `gpdp keygen` was taken: averaging
//! one count over a hundred keys gave the exact count.

use std::path::{Path, PathBuf};

use crate::common::*;
use serde_json::json;

const SQL: &str = "SELECT sex, count(DISTINCT patient_id) AS n FROM patients GROUP BY sex";

/// The shipped policy with a budget of two questions (ρ 0.02 each).
fn small_budget(dir: &Path) -> PathBuf {
    let text = gpdp::policy::tre::DEFAULT_TRE_POLICY;
    assert!(text.contains("rho_budget = 2.0"));
    let path = dir.join("tre.toml");
    std::fs::write(&path, text.replace("rho_budget = 2.0", "rho_budget = 0.04")).unwrap();
    path
}

fn ask(store: &Path, policy: &Path) -> std::process::Output {
    run(&[
        "query",
        "--store",
        store.to_str().unwrap(),
        "--project",
        "demo-research",
        "--user",
        "dana",
        "--token",
        "demo-dana-token",
        "--policy",
        policy.to_str().unwrap(),
        SQL,
    ])
}

fn verify_log(store: &Path) -> std::process::Output {
    run(&["audit", "--store", store.to_str().unwrap(), "--verify-log"])
}

/// A cache file claiming dana has spent nothing does not give her a
/// fresh budget: her spend is what the log's charges add up to.
#[test]
fn a_ledger_cache_edited_to_zero_does_not_reset_a_budget() {
    let c = collected_with_ndoo(2, 300, 71, 19);
    let dir = tempfile::tempdir().unwrap();
    let policy = small_budget(dir.path());
    for _ in 0..2 {
        let o = ask(&c.store, &policy);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = ask(&c.store, &policy);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("budget_exhausted"), "{}", stderr(&o));
    // What the review did: the ledger's cache as an earlier gpdp wrote
    // it — at the end of the log, with the hash of its last line, so that
    // it reads as up to date — with dana's spend set to 0.
    let log = std::fs::read_to_string(c.store.join("audit/log.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    let generation = manifest(&c.store)["generation"].clone();
    std::fs::write(
        c.store.join("audit/privacy-ledger.json"),
        json!({"offset": log.len(), "hash": last["hash"],
               "state": {"unreadable": false, "by_user": {"dana": 0.0}, "charges": {}, "generation": generation}})
        .to_string(),
    )
    .unwrap();
    let o = ask(&c.store, &policy);
    assert_eq!(
        o.status.code(),
        Some(3),
        "the edited cache reset the budget: {}",
        stdout(&o)
    );
    assert!(stderr(&o).contains("budget_exhausted"), "{}", stderr(&o));
    let o = verify_log(&c.store);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A log whose charges add up past a budget, or where a charge records a
/// spend below what the log had already charged (a reset ledger), fails
/// `privacy_budgets_respected` in `gpdp audit` and `--verify-log`, though
/// its hash chain is intact. The untouched log passes: the control.
#[test]
fn the_audit_replays_every_charge_and_fails_an_overspend_or_a_reset() {
    let c = collected_with_ndoo(2, 300, 72, 20);
    let dir = tempfile::tempdir().unwrap();
    let policy = small_budget(dir.path());
    for _ in 0..2 {
        let o = ask(&c.store, &policy);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = verify_log(&c.store);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["audit", "--store", c.store.to_str().unwrap(), "--json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let budgets = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "privacy_budgets_respected")
        .expect("the check runs")
        .clone();
    assert_eq!(budgets["passed"], true, "{budgets}");
    assert!(
        budgets["detail"]
            .as_str()
            .unwrap()
            .starts_with("2 privacy charges")
    );

    let charge = |spent: f64| {
        json!({"event": "privacy_charge", "time": "2026-12-07T00:00:00Z", "user": "dana",
               "project": "demo-research", "rho": 0.02, "spent": spent, "budget": 0.04,
               "plan_fingerprint": "x"})
    };
    for (name, line, says) in [
        ("overspend", charge(0.06), "over a budget"),
        ("reset", charge(0.02), "the ledger was reset"),
    ] {
        let copy = dir.path().join(name);
        copy_dir(&c.store, &copy);
        // Appended through the log's own API: the chain stays intact.
        gpdp::store::log::AuditLog::at(&copy)
            .append(&[line])
            .unwrap();
        let o = verify_log(&copy);
        assert_eq!(o.status.code(), Some(3), "{name}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("privacy_budgets_respected"),
            "{}",
            stderr(&o)
        );
        assert!(stderr(&o).contains(says), "{name}: {}", stderr(&o));
        let o = run(&["audit", "--store", copy.to_str().unwrap(), "--json"]);
        assert_eq!(o.status.code(), Some(3), "{name}");
        let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let failed: Vec<&str> = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["passed"] == false)
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(failed, ["privacy_budgets_respected"], "{name}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for (rel, bytes) in tree(from) {
        let path = to.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

/// The first cell-key answer binds the store to its perturbation key;
/// another key is refused (`perturbation_key_changed`) — its fresh noise
/// on the same cells could be averaged away — until the holder of the
/// bound key rotates it, with a reason, in the log. Then the old key is
/// the one refused.
#[test]
fn a_store_answers_under_one_perturbation_key_until_it_is_rotated() {
    let c = collected_with_ndoo(2, 300, 73, 21);
    let dir = tempfile::tempdir().unwrap();
    let key = |name: &str| {
        let path = dir.path().join(name);
        let o = run(&["keygen", "--out", path.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        path
    };
    let (first, second) = (key("first.key"), key("second.key"));
    let ask = |key: &Path| {
        run(&[
            "query",
            "--store",
            c.store.to_str().unwrap(),
            "--project",
            "demo-planning-exempt",
            "--user",
            "carol",
            "--token",
            "demo-carol-token",
            "--perturbation-key",
            key.to_str().unwrap(),
            SQL,
        ])
    };
    let o = ask(&first);
    assert!(o.status.success(), "{}", stderr(&o));
    let answer = stdout(&o);
    let o = ask(&second);
    assert_eq!(
        o.status.code(),
        Some(3),
        "a second key was answered: {}",
        stdout(&o)
    );
    assert!(
        stderr(&o).contains("refused by rule perturbation_key_changed"),
        "{}",
        stderr(&o)
    );
    let o = ask(&first);
    assert_eq!(stdout(&o), answer, "the bound key answers as before");

    let rotate = |from: &Path, to: &Path, reason: &str| {
        run(&[
            "rotate-perturbation-key",
            "--store",
            c.store.to_str().unwrap(),
            "--from",
            from.to_str().unwrap(),
            "--to",
            to.to_str().unwrap(),
            "--reason",
            reason,
        ])
    };
    // Only the holder of the bound key rotates it, and says why.
    let o = rotate(&second, &first, "a test");
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let o = rotate(&first, &second, " ");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = rotate(&first, &second, "the key file was exposed in a backup");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = ask(&second);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = ask(&first);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let log = std::fs::read_to_string(c.store.join("audit/log.jsonl")).unwrap();
    assert_eq!(log.matches("\"event\":\"perturbation_key\"").count(), 1);
    assert!(log.contains("the key file was exposed in a backup"));
    // No key material in the log: ids only.
    for path in [&first, &second] {
        let bytes = std::fs::read(path).unwrap();
        assert!(!log.contains(&gpdp::digest::hex(&bytes)));
    }
    let o = verify_log(&c.store);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A budget belongs to the patients, not to a directory: the same extract
/// collected into a second store (the same collection key: the same
/// population) shares the spend of the first, whether the stores sit side
/// by side (their default ledger, `ledgers/` beside them) or anywhere with
/// one `--ledger DIR`; a store of other patients (another key) has its own.
/// Before, each directory had its own budget: with twelve stores the best
/// membership test went from 84% to 99.97%.
#[test]
fn every_store_of_the_same_patients_spends_from_one_budget() {
    let c = collected_with_ndoo(2, 300, 74, 22);
    let dir = tempfile::tempdir().unwrap();
    let policy = small_budget(dir.path());
    let twin = c.store.with_file_name("twin");
    let elsewhere = dir.path().join("elsewhere");
    let other_key = key_file(dir.path(), 23);
    let other = c.store.with_file_name("other");
    for (store, key) in [(&twin, &c.key), (&elsewhere, &c.key), (&other, &other_key)] {
        let o = collect(&c.extract, store, key);
        assert!(o.status.success(), "{}", stderr(&o));
        let o = run(&[
            "optout",
            "ingest",
            "--ndoo",
            c.extract.join("national/ndoo.csv").to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let ask_with = |store: &Path, extra: &[&str]| {
        let mut args = vec![
            "query",
            "--store",
            store.to_str().unwrap(),
            "--project",
            "demo-research",
            "--user",
            "dana",
            "--token",
            "demo-dana-token",
            "--policy",
            policy.to_str().unwrap(),
        ];
        args.extend(extra);
        args.push(SQL);
        run(&args)
    };
    // Spend the whole budget in the first store.
    for _ in 0..2 {
        let o = ask(&c.store, &policy);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = ask(&twin, &policy);
    assert_eq!(
        o.status.code(),
        Some(3),
        "a second store gave a fresh budget: {}",
        stdout(&o)
    );
    assert!(stderr(&o).contains("budget_exhausted"), "{}", stderr(&o));
    // The control: other patients, their own budget.
    let o = ask(&other, &policy);
    assert!(o.status.success(), "{}", stderr(&o));
    // A store elsewhere shares it through one ledger directory.
    let ledgers = dir.path().join("tre-ledgers");
    for _ in 0..2 {
        let o = ask_with(&elsewhere, &["--ledger", ledgers.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = ask_with(&c.store, &["--ledger", ledgers.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", stdout(&o));
    // The ledger verifies and replays, and so does each store's copy.
    let o = run(&["audit", "--store", c.store.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let budgets = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "privacy_budgets_respected")
        .unwrap()
        .clone();
    assert!(
        budgets["detail"]
            .as_str()
            .unwrap()
            .contains("its chain intact"),
        "{budgets}"
    );
}

/// Under a rule set with a budget of released cells (the cell key method
/// in the shipped policy), every released statistic is charged to the
/// researcher over the population; an answer that would pass the budget is
/// refused (`query_budget_exhausted`) and spends the rest, so that nothing
/// more is released — not even an answer that would have fitted, whose
/// fitting would depend on the data. `gpdp audit` replays the cell charges.
#[test]
fn released_cells_are_charged_and_stop_at_the_cell_budget() {
    let c = collected_with_ndoo(2, 300, 75, 24);
    let dir = tempfile::tempdir().unwrap();
    let text = gpdp::policy::tre::DEFAULT_TRE_POLICY;
    let at = text.find("[disclosure.ckm]").unwrap();
    let (head, tail) = text.split_at(at + "[disclosure.ckm]".len());
    let tail = tail
        .lines()
        .filter(|l| !l.trim_start().starts_with("cell_budget"))
        .collect::<Vec<_>>()
        .join("\n");
    let policy = dir.path().join("tre.toml");
    std::fs::write(&policy, format!("{head}\ncell_budget = 5\n{tail}\n")).unwrap();
    let key = dir.path().join("perturbation.key");
    let o = run(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (user, token) = researcher_of("demo-planning-exempt");
    let ask = |sql: &str| {
        run(&[
            "query",
            "--store",
            c.store.to_str().unwrap(),
            "--project",
            "demo-planning-exempt",
            "--user",
            user,
            "--token",
            token,
            "--policy",
            policy.to_str().unwrap(),
            "--perturbation-key",
            key.to_str().unwrap(),
            "--format",
            "json",
            sql,
        ])
    };
    // Two cells (one count per sex), then two more: 4 of 5.
    for _ in 0..2 {
        let o = ask(SQL);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    // Two more would make 6: refused, and the last cell is spent with it.
    let o = ask(SQL);
    assert_eq!(o.status.code(), Some(3), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("refused by rule query_budget_exhausted"),
        "{}",
        stderr(&o)
    );
    // One cell would have fitted before the refusal; it does not now.
    let o = ask("SELECT count(DISTINCT patient_id) AS n FROM patients");
    assert_eq!(o.status.code(), Some(3), "{}", stdout(&o));
    let o = run(&["audit", "--store", c.store.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    // The control: an over-budget cell charge in the store's log fails it.
    gpdp::store::log::AuditLog::at(&c.store)
        .append(&[serde_json::json!({"event": "cell_charge", "user": user, "project": "demo-planning-exempt",
            "cells": 3, "spent_cells": 8, "cell_budget": 5})])
        .unwrap();
    let o = run(&["audit", "--store", c.store.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(3), "{}", stdout(&o));
    assert!(stdout(&o).contains("over a budget of 5"), "{}", stdout(&o));
}
