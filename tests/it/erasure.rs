//! Erasure that survives a restore, and patients informed (issue 15), as an
//! auditor, an operator and a practice drive them: `gpdp audit`'s
//! `no_rollback` against a store restored from a backup, a truncated log,
//! a file put back by hand, and a log and store rolled back together
//! (caught only with a published head, `--head` / `--expect-head`); the
//! public register (`gpdp register`) and its "no identifiers" property;
//! and a patient's own answer at the practice (`gpdp optout status`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::*;

/// A fresh store: 3 practices, NDOO ingested.
fn setup() -> Collected {
    collected_with_ndoo(3, 1500, 71, 6)
}

/// Patients with no Type 1 code anywhere, movers first.
fn later_opt_outs(c: &Collected, n: usize) -> Vec<String> {
    let mut practices: BTreeMap<String, usize> = BTreeMap::new();
    for r in Csv::read(&c.extract.join("truth/patients.csv")).records() {
        if r["type1_anywhere"] == "false" {
            *practices.entry(r["nhs_number"].clone()).or_default() += 1;
        }
    }
    let mut out: Vec<String> = practices
        .iter()
        .filter(|(_, k)| **k > 1)
        .map(|(nhs, _)| nhs.clone())
        .take(2)
        .collect();
    out.extend(
        practices
            .iter()
            .filter(|(_, k)| **k == 1)
            .map(|(nhs, _)| nhs.clone())
            .take(n - out.len()),
    );
    out
}

/// Runs `gpdp optout apply --purge` for `numbers`: unreachable, then
/// erased (two commits).
fn apply_later(c: &Collected, numbers: &[String]) {
    let list = c._dir.path().join("type1-requests.csv");
    std::fs::write(&list, format!("nhs_number\n{}\n", numbers.join("\n"))).unwrap();
    let o = optout_apply(&c.store, &c.key, &list)
        .arg("--purge")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `cp -a`: the store has symlinks (optouts/tombstones.parquet).
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

fn audit(c: &Collected, extra: &[&str]) -> std::process::Output {
    gpdp()
        .arg("audit")
        .args(c.truth_args())
        .args(extra)
        .output()
        .unwrap()
}

/// The line of the audit table for `check`.
fn line<'a>(out: &'a str, check: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(check))
        .unwrap_or_else(|| panic!("no {check} line in\n{out}"))
}

fn head(store: &Path) -> String {
    let o = run(&["audit", "--store", store.to_str().unwrap(), "--head"]);
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o).trim().to_owned()
}

fn stored(store: &Path) -> std::collections::HashSet<[u8; 32]> {
    ["patients", "clinical_events", "medications"]
        .iter()
        .flat_map(|t| patient_ids(&read_table(store, t)))
        .collect()
}

#[test]
fn a_store_restored_from_before_a_deletion_is_caught_with_its_generation_and_files() {
    let c = setup();
    let backup = c._dir.path().join("backup");
    copy_dir(&c.store, &backup);
    let before_generation = manifest(&c.store)["generation"].as_u64().unwrap();

    let numbers = later_opt_outs(&c, 6);
    apply_later(&c, &numbers);
    let o = audit(&c, &[]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(line(&stdout(&o), "no_rollback").contains("pass"));
    let after = c._dir.path().join("after");
    copy_dir(&c.store, &after);
    let published = head(&c.store);

    // The incident: the store is restored from the backup, under the
    // current audit log (and the current opt-out lists).
    let log = std::fs::read(c.store.join("audit/log.jsonl")).unwrap();
    copy_dir(&backup, &c.store);
    std::fs::write(c.store.join("audit/log.jsonl"), &log).unwrap();
    let targets: Vec<[u8; 32]> = numbers.iter().map(|n| pseudonym(6, n)).collect();
    let back = stored(&c.store);
    assert!(
        targets.iter().all(|t| back.contains(t)),
        "the restore brings the deleted patients back (the scenario)"
    );
    let o = audit(&c, &[]);
    assert_eq!(o.status.code(), Some(3), "{}", stdout(&o));
    let out = stdout(&o);
    let failed = line(&out, "no_rollback");
    assert!(failed.contains("FAIL"), "{failed}");
    assert!(
        // Two generations: the deletion (vectors) and its purge.
        failed.contains(&format!(
            "manifest in force is generation {before_generation}"
        )) && failed.contains(&format!("generation {}", before_generation + 2))
            && failed.contains("restored from an older copy"),
        "{failed}"
    );
    assert!(
        failed.contains("optouts/tombstones-"),
        "names the files: {failed}"
    );
    assert!(stderr(&o).contains("no_rollback"), "{}", stderr(&o));
    // The rest of the audit cannot see it: every other check passes.
    for check in [
        "files_match_manifest",
        "tombstoned_patients_unreachable",
        "tombstoned_patients_absent",
        "type1_patients_absent",
    ] {
        assert!(line(&out, check).contains("pass"), "{out}");
    }
    let o = run(&[
        "audit",
        "--store",
        c.store.to_str().unwrap(),
        "--verify-log",
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("no_rollback failed"), "{}", stderr(&o));

    // A log and store rolled back together are consistent with each other:
    // only someone holding the published head can tell.
    copy_dir(&backup, &c.store);
    let o = audit(&c, &[]);
    assert!(o.status.success(), "{}", stdout(&o));
    let o = audit(&c, &["--expect-head", &published]);
    assert_eq!(o.status.code(), Some(3), "{}", stdout(&o));
    let failed = line(&stdout(&o), "log_extends_head").to_owned();
    assert!(
        failed.contains("FAIL") && failed.contains("rolled back"),
        "{failed}"
    );
    let o = run(&[
        "audit",
        "--store",
        c.store.to_str().unwrap(),
        "--verify-log",
        "--expect-head",
        &published,
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("log_extends_head"), "{}", stderr(&o));

    // A truncated log under the current store: the deletion's lines are gone.
    copy_dir(&after, &c.store);
    let text = String::from_utf8(log.clone()).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .take_while(|l| !l.contains("\"event\":\"delete\""))
        .collect();
    std::fs::write(c.store.join("audit/log.jsonl"), kept.join("\n") + "\n").unwrap();
    let o = audit(&c, &[]);
    assert_eq!(o.status.code(), Some(3));
    let out = stdout(&o);
    assert!(line(&out, "audit_log_intact").contains("FAIL"), "{out}");
    let failed = line(&out, "no_rollback");
    assert!(
        failed.contains("FAIL")
            && failed.contains(&format!("generation {}", before_generation + 2)),
        "{failed}"
    );

    // The manifest edited by hand to put a pre-purge file back in force
    // (with its true checksum, so files_match_manifest passes).
    copy_dir(&after, &c.store);
    let entries: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["entry"].clone())
        .collect();
    let delete = entries.iter().find(|e| e["event"] == "purge").unwrap();
    let proof = &delete["proof"][0];
    let (practice, table) = (
        proof["practice"].as_str().unwrap(),
        proof["table"].as_str().unwrap(),
    );
    let old = manifest(&backup)["batches"][practice]["files"][table].clone();
    assert_eq!(old["sha256"], proof["sha256_before"]);
    let old_path = old["path"].as_str().unwrap();
    std::fs::copy(backup.join(old_path), c.store.join(old_path)).unwrap();
    let mut m = manifest(&c.store);
    m["batches"][practice]["files"][table] = old.clone();
    std::fs::write(
        c.store.join("manifest.json"),
        serde_json::to_string_pretty(&m).unwrap(),
    )
    .unwrap();
    let o = audit(&c, &[]);
    assert_eq!(o.status.code(), Some(3));
    let out = stdout(&o);
    assert!(line(&out, "files_match_manifest").contains("pass"), "{out}");
    let failed = line(&out, "no_rollback");
    assert!(
        failed.contains("FAIL")
            && failed.contains(old_path)
            && failed.contains("deletion replaced, back in force"),
        "{failed}"
    );
}

#[test]
fn the_head_is_one_line_to_publish_and_a_rewritten_log_does_not_extend_it() {
    let c = setup();
    let published = head(&c.store);
    let fields: Vec<&str> = published.split(' ').collect();
    assert_eq!(fields.len(), 4, "{published}");
    for (f, k) in fields.iter().zip(["seq=", "hash=", "generation=", "time="]) {
        assert!(f.starts_with(k), "{published}");
    }
    // The log grows (a query, a deletion): it still extends the head.
    let o = query_as_alice(
        &c.store,
        &["SELECT sex, count(*) AS n FROM patients GROUP BY sex"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    apply_later(&c, &later_opt_outs(&c, 3));
    let o = audit(&c, &["--expect-head", &published]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(line(&stdout(&o), "log_extends_head").contains("pass"));
    let o = run(&[
        "audit",
        "--store",
        c.store.to_str().unwrap(),
        "--head",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(json["seq"].as_u64().unwrap() > fields[0][4..].parse::<u64>().unwrap());

    // A head that is not one: a usage error, nothing checked.
    let o = audit(&c, &["--expect-head", "seq=3 hash=xyz"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("64 hex digits"), "{}", stderr(&o));

    // Rewriting the log from an earlier line (re-chained, so it verifies)
    // does not extend the head published before.
    let log = std::fs::read_to_string(c.store.join("audit/log.jsonl")).unwrap();
    let seq: usize = fields[0][4..].parse().unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let rewritten_dir = c._dir.path().join("rewritten");
    copy_dir(&c.store, &rewritten_dir);
    let rewritten = gpdp::store::log::AuditLog::at(&rewritten_dir);
    std::fs::write(rewritten.path(), "").unwrap();
    for (i, l) in lines.iter().enumerate() {
        let mut entry = serde_json::from_str::<serde_json::Value>(l).unwrap()["entry"].clone();
        if i + 1 == seq {
            entry["time"] = serde_json::json!("2000-01-01T00:00:00.000Z");
        }
        rewritten.append(&[entry]).unwrap();
    }
    let o = run(&[
        "audit",
        "--store",
        rewritten_dir.to_str().unwrap(),
        "--verify-log",
    ]);
    assert!(
        o.status.success(),
        "the forged log verifies on its own: {}",
        stderr(&o)
    );
    let o = run(&[
        "audit",
        "--store",
        rewritten_dir.to_str().unwrap(),
        "--verify-log",
        "--expect-head",
        &published,
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("rewritten"), "{}", stderr(&o));
}

#[test]
fn the_register_lists_what_was_asked_and_holds_no_identifier() {
    let c = setup();
    let truth = Csv::read(&c.extract.join("truth/patients.csv")).records();
    let nhs = truth[0]["nhs_number"].clone();
    let pseudo: String = pseudonym(6, &nhs)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // Released: one plain, one with a comment naming a patient; refused: one
    // naming a patient in the SQL.
    let asked = [
        "SELECT sex, count(*) AS n FROM patients GROUP BY sex".to_owned(),
        format!(
            "SELECT age_band, count(*) AS n FROM patients -- {nhs} {pseudo}\nGROUP BY age_band"
        ),
        format!("SELECT count(*) FROM patients WHERE patient_id = '{pseudo}'"),
    ];
    for sql in &asked {
        let _ = query_as_alice(&c.store, &[sql]);
    }
    apply_later(&c, &later_opt_outs(&c, 4));
    let out = c._dir.path().join("register");
    let o = run(&[
        "register",
        "--store",
        c.store.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json_text = std::fs::read_to_string(out.join("register.json")).unwrap();
    let html = std::fs::read_to_string(out.join("register.html")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&json_text).unwrap();

    // What a reader needs.
    assert_eq!(r["projects"].as_array().unwrap().len(), 4);
    let research = r["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "demo-research")
        .unwrap();
    assert_eq!(research["national_data_opt_out"], "applies");
    assert_eq!(research["disclosure"], "dp");
    assert_eq!(research["approved_researchers"], 1);
    assert!(
        research["legal_basis"]
            .as_str()
            .unwrap()
            .contains("Article")
    );
    let activity = r["activity"].as_array().unwrap();
    let of = |k: &str| -> u64 {
        activity
            .iter()
            .filter(|a| a["project"] == "demo-opensafely")
            .map(|a| a[k].as_u64().unwrap())
            .sum()
    };
    assert_eq!((of("released"), of("refused"), of("failed")), (2, 1, 0));
    assert!(of("cells_released") >= 2 + 8 - 1, "{activity:?}");
    let released = r["released_queries"].as_array().unwrap();
    assert_eq!(released.len(), 2);
    assert_eq!(released[0]["sql"], asked[0]);
    let second = released[1]["sql"].as_str().unwrap();
    assert!(
        second.contains("GROUP BY age_band") && !second.contains("--"),
        "{second}"
    );
    assert_eq!(released[1]["result_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(r["optouts"]["type1_deleted_later"], 4);
    // Both phases ran (apply --purge): erased too, with both latencies.
    assert_eq!(r["optouts"]["type1_erased_later"], 4);
    assert_eq!(r["optouts"]["purge_runs"], 1);
    for k in [
        "unreachable_latency_max_seconds",
        "erased_latency_max_seconds",
    ] {
        assert!(r["optouts"][k].as_f64().is_some(), "{k}: {}", r["optouts"]);
    }
    assert!(
        r["optouts"]["national_data_opt_out_listed"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(
        r["log_head"]["seq"].as_u64().unwrap(),
        head(&c.store).split(' ').next().unwrap()[4..]
            .parse::<u64>()
            .unwrap()
    );
    for words in [
        "For patients",
        "Type 1 opt-out",
        "National Data Opt-out",
        "never leave the practice",
    ] {
        assert!(html.contains(words), "{words}");
    }

    // No identifier of any kind, in either file.
    let m = manifest(&c.store);
    let key_hex: String = std::fs::read(&c.key)
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut forbidden = vec![key_hex, m["key_id"].as_str().unwrap().to_owned()];
    // No researcher's name.
    for (user, ..) in expected_guarantees(gpdp::policy::tre::DEFAULT_TRE_POLICY) {
        forbidden.push(user);
    }
    for r in &truth {
        forbidden.push(r["nhs_number"].clone());
    }
    for id in stored(&c.store) {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        forbidden.push(hex[..16].to_owned());
    }
    for text in [&json_text, &html] {
        let lower = text.to_lowercase();
        for f in &forbidden {
            assert!(
                !lower.contains(&f.to_lowercase()),
                "the register contains {f}"
            );
        }
    }
}

/// The register states each approved researcher's effective guarantee —
/// the weakest rule set among their projects, worked out by the test from
/// the policy's text — without naming them. The policy is the shipped one
/// (one researcher per rule set) plus "xavier", approved for `dp` and
/// OpenSAFELY's rules with a recorded reason: the positive control, whose
/// `dp` project does not make them ρ-bounded.
#[test]
fn the_register_states_each_researchers_effective_guarantee_without_naming_them() {
    let c = collected_with_ndoo(1, 300, 73, 8);
    let policy_text = format!(
        "{}\n[[researchers]]\nuser = \"xavier\"\ntoken_sha256 = \"{}\"\nprojects = [\"demo-research\", \"demo-opensafely\"]\nrho_budget = 1.5\nmixed_rules_reason = \"a methods comparison, every output checked by hand\"\n",
        gpdp::policy::tre::DEFAULT_TRE_POLICY,
        "0".repeat(64)
    );
    let policy = c._dir.path().join("tre.toml");
    std::fs::write(&policy, &policy_text).unwrap();
    let out = c._dir.path().join("register");
    let o = run(&[
        "register",
        "--store",
        c.store.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json_text = std::fs::read_to_string(out.join("register.json")).unwrap();
    let html = std::fs::read_to_string(out.join("register.html")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&json_text).unwrap();

    let expected: Vec<_> = expected_guarantees(&policy_text)
        .into_iter()
        .filter(|(_, projects, ..)| !projects.is_empty())
        .collect();
    let got: Vec<(Vec<String>, String, String)> = r["researchers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["projects"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_str().unwrap().to_owned())
                    .collect(),
                e["guarantee"].as_str().unwrap().to_owned(),
                e["effective_guarantee"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(Vec<String>, String, String)> = expected
        .iter()
        .map(|(_, p, code, words)| (p.clone(), code.clone(), words.clone()))
        .collect();
    assert_eq!(got, want);
    // One of each kind; xavier, though on a `dp` project, is deterministic.
    let codes: Vec<&str> = want.iter().map(|w| w.1.as_str()).collect();
    assert_eq!(
        codes,
        [
            "deterministic",
            "rho_bounded",
            "cell_key",
            "deterministic",
            "deterministic"
        ]
    );
    assert_eq!(r["researchers"][4]["mixed_rules_reason_recorded"], true);
    for (_, _, _, words) in &expected {
        assert!(html.contains(words.as_str()), "the page lacks {words}");
    }
    for (user, ..) in expected_guarantees(&policy_text) {
        for text in [&json_text, &html] {
            assert!(
                !text.to_lowercase().contains(&user),
                "the register names {user}"
            );
        }
    }
}

#[test]
fn a_patient_gets_their_own_answer_at_the_practice() {
    let c = setup();
    let truth = Csv::read(&c.extract.join("truth/patients.csv")).records();
    let later = later_opt_outs(&c, 3);
    apply_later(&c, &later);
    let status = |nhs: &str| optout_status(&c, nhs);
    let project = |s: &serde_json::Value, id: &str| -> bool {
        s["projects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["project"] == id)
            .unwrap()["can_include"]
            .as_bool()
            .unwrap()
    };

    // Deleted after a later Type 1 opt-out.
    let s = status(&later[0]);
    assert_eq!(s["in_store"], false, "{s}");
    assert_eq!(s["type1"]["kind"], "type1_request");
    assert!(!project(&s, "demo-planning-exempt"));

    // Dissent found at collection: never collected.
    let t1 = truth
        .iter()
        .find(|r| r["type1_at_extract"] == "true")
        .unwrap();
    let s = status(&t1["nhs_number"]);
    assert_eq!(
        (s["in_store"].clone(), s["type1"]["kind"].clone()),
        (false.into(), "type1_at_collection".into()),
        "{s}"
    );

    // On the National Data Opt-out: in the store, in the exempt project only.
    // The first patient with no Type 1 code and no later request, on the
    // NDOO list or not.
    let first = |ndoo: &str| {
        truth
            .iter()
            .find(|r| {
                r["ndoo"] == ndoo
                    && r["type1_anywhere"] == "false"
                    && !later.contains(&r["nhs_number"])
            })
            .unwrap()
    };
    let nd = first("true");
    let s = status(&nd["nhs_number"]);
    assert_eq!(
        (s["in_store"].clone(), s["national_data_opt_out"].clone()),
        (true.into(), true.into()),
        "{s}"
    );
    assert!(!project(&s, "demo-research") && !project(&s, "demo-opensafely"));
    assert!(project(&s, "demo-planning-exempt"));

    // Nobody's opt-out: in every project.
    let plain = first("false");
    let s = status(&plain["nhs_number"]);
    assert_eq!(s["in_store"], true);
    assert!(s["type1"].is_null() && s["national_data_opt_out"] == false);
    for id in [
        "demo-research",
        "demo-planning-exempt",
        "demo-prescribing-acro",
        "demo-opensafely",
    ] {
        assert!(project(&s, id), "{id}: {s}");
    }
    // In words, too.
    let o = run(&[
        "optout",
        "status",
        "--nhs-number",
        &plain["nhs_number"],
        "--store",
        c.store.to_str().unwrap(),
        "--key",
        c.key.to_str().unwrap(),
    ]);
    assert!(
        stdout(&o).starts_with("In the store: yes"),
        "{}",
        stdout(&o)
    );

    // A wrong number is a usage error that does not echo it.
    let bad = format!("{}0", &plain["nhs_number"][..9]);
    let bad = if nhs_valid(&bad) {
        format!("{}1", &plain["nhs_number"][..9])
    } else {
        bad
    };
    let o = run(&[
        "optout",
        "status",
        "--nhs-number",
        &bad,
        "--store",
        c.store.to_str().unwrap(),
        "--key",
        c.key.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!stderr(&o).contains(&bad), "{}", stderr(&o));
}
