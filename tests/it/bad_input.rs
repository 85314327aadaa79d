//! Bad input never loses data or privacy: every case here is an input a
//! careless or hostile operator could give, and each test checks that the
//! store is exactly as it was (or, where a run goes on past a held batch,
//! that only the good part changed), that the command says why with a
//! named rule and the right exit status, and that nothing panics.
//!
//! Each of these failed before the guard it tests existed: an empty NDOO
//! list un-opted everyone; a cut extract replaced a whole batch; `link`
//! into a mistyped path made a new store; a flipped byte was answered
//! from; a closed pipe panicked; a nested query and an INSERT got raw
//! planner errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::common::*;

/// Every file of a store but the verification cache, as bytes.
fn snapshot(store: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut t = tree(store);
    t.retain(|p, _| !p.ends_with("verified.json") && !p.ends_with(".lock"));
    t
}

fn generation(store: &Path) -> u64 {
    manifest(store)["generation"].as_u64().unwrap()
}

fn ingest(c: &Collected, list: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "optout",
        "ingest",
        "--ndoo",
        list.to_str().unwrap(),
        "--store",
        c.store.to_str().unwrap(),
        "--key",
        c.key.to_str().unwrap(),
    ];
    args.extend(extra);
    run(&args)
}

/// `gpdp query` as alice in demo-opensafely, on `store`.
fn query(store: &Path, sql: &str) -> std::process::Output {
    query_as_alice(store, &[sql])
}

/// An empty NDOO list and one cut in half are refused (exit 3, rules
/// `empty` and `shrink`), naming the counts, and change nothing — the
/// opted-out patients stay unreachable; `--accept-shrink` takes each, and
/// the audit log records it with the counts.
#[test]
fn an_empty_or_halved_ndoo_list_is_refused_unless_accepted() {
    let c = collected_with_ndoo(2, 400, 61, 13);
    let full = std::fs::read_to_string(c.extract.join("national/ndoo.csv")).unwrap();
    let numbers: Vec<&str> = full.lines().skip(1).collect();
    assert!(numbers.len() >= 10, "{} on the list", numbers.len());
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.csv");
    std::fs::write(&empty, "nhs_number\n").unwrap();
    let half = dir.path().join("half.csv");
    std::fs::write(
        &half,
        format!("nhs_number\n{}\n", numbers[..numbers.len() / 2].join("\n")),
    )
    .unwrap();
    let count = |store: &Path| {
        let o = query(store, "SELECT count(*) AS n FROM patients");
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let before_count = count(&c.store);
    for (list, rule) in [(&empty, "empty"), (&half, "shrink")] {
        let before = snapshot(&c.store);
        let o = ingest(&c, list, &[]);
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("refused by rule {rule}")),
            "{}",
            stderr(&o)
        );
        assert!(stderr(&o).contains("--accept-shrink"), "{}", stderr(&o));
        assert_eq!(
            snapshot(&c.store),
            before,
            "a refused list changed the store"
        );
        assert_eq!(
            count(&c.store),
            before_count,
            "the opt-outs in force changed"
        );
    }
    // The operator who knows better takes the halved list; the log says so.
    let g = generation(&c.store);
    let o = ingest(&c, &half, &["--accept-shrink"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(generation(&c.store), g + 1);
    let last = log_events(&c.store)
        .into_iter()
        .rfind(|e| e["event"] == "ndoo_ingest")
        .unwrap();
    assert_eq!(last["accepted_shrink"]["rule"], "shrink");
    assert_eq!(
        last["accepted_shrink"]["patients"].as_u64(),
        Some(last["patients"].as_u64().unwrap())
    );
    assert!(
        last["accepted_shrink"]["patients_in_force"]
            .as_u64()
            .unwrap()
            > last["patients"].as_u64().unwrap()
    );
    // The positive control: a list that loses nobody is taken as before.
    let o = ingest(&c, &c.extract.join("national/ndoo.csv"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A practice's `patients.csv` cut mid-line (a broken download): that
/// practice's batch is held (exit 3, rule `truncated`), its batch in force
/// stays byte for byte, and the other practice's newer extract is taken in
/// the same run. A file cut at a line ending loses half the patients: held
/// by `shrink`. `--accept-shrink` takes it.
#[test]
fn a_cut_extract_is_held_and_the_rest_is_collected() {
    let c = collected(2, 400, 62, 14);
    let practices = practice_dirs(&c.extract);
    let (cut, other) = (&practices[0], &practices[1]);
    let cut_code = cut.file_name().unwrap().to_str().unwrap().to_owned();
    let other_code = other.file_name().unwrap().to_str().unwrap().to_owned();
    let batch_of = |code: &str| manifest(&c.store)["batches"][code]["batch"].clone();
    let cut_batch = batch_of(&cut_code);
    let cut_files: Vec<Vec<u8>> = ["patients", "clinical_events", "medications"]
        .iter()
        .map(|t| {
            let rel = manifest(&c.store)["batches"][cut_code.as_str()]["files"][t]["path"]
                .as_str()
                .unwrap()
                .to_owned();
            std::fs::read(c.store.join(rel)).unwrap()
        })
        .collect();
    // The other practice's extract changes (one medication row fewer), so
    // it is a newer batch that must be taken.
    let meds = other.join("medications.csv");
    let text = std::fs::read_to_string(&meds).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.pop();
    std::fs::write(&meds, lines.join("\n") + "\n").unwrap();
    let other_batch = batch_of(&other_code);

    let patients = cut.join("patients.csv");
    let whole = std::fs::read(&patients).unwrap();
    std::fs::write(&patients, &whole[..whole.len() / 2]).unwrap();
    assert_ne!(whole[whole.len() / 2 - 1], b'\n', "cut mid-line");
    let o = collect(&c.extract, &c.store, &c.key);
    assert_eq!(o.status.code(), Some(3), "{}\n{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("HELD by rule truncated"),
        "{}",
        stdout(&o)
    );
    assert!(stderr(&o).contains(&cut_code), "{}", stderr(&o));
    assert_eq!(
        batch_of(&cut_code),
        cut_batch,
        "the held batch replaced the one in force"
    );
    assert_ne!(
        batch_of(&other_code),
        other_batch,
        "the rest of the run was not taken"
    );
    for (t, bytes) in ["patients", "clinical_events", "medications"]
        .iter()
        .zip(&cut_files)
    {
        let rel = manifest(&c.store)["batches"][cut_code.as_str()]["files"][t]["path"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            &std::fs::read(c.store.join(rel)).unwrap(),
            bytes,
            "{t} changed"
        );
    }
    let held = log_events(&c.store)
        .into_iter()
        .rfind(|e| e["event"] == "collect_held")
        .expect("the hold is in the audit log");
    assert_eq!(held["practice"], cut_code.as_str());
    assert_eq!(held["rule"], "truncated");
    // The report lists what is held, and why.
    let out = c.store.with_file_name("report");
    let o = run(&[
        "report",
        "--store",
        c.store.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let listed = report["collection"]["held"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["input"], cut_code.as_str());
    assert_eq!(listed[0]["rule"], "truncated");
    assert!(
        std::fs::read_to_string(out.join("report.html"))
            .unwrap()
            .contains("held by the shrink guards")
    );

    // Cut at a line ending: no sign of a cut but the patients lost.
    let at = whole[..whole.len() / 2]
        .iter()
        .rposition(|&b| b == b'\n')
        .unwrap();
    std::fs::write(&patients, &whole[..=at]).unwrap();
    let o = collect(&c.extract, &c.store, &c.key);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("HELD by rule quarantine_share") || out.contains("HELD by rule shrink"),
        "{out}"
    );
    assert_eq!(batch_of(&cut_code), cut_batch);

    // Taken on purpose, and logged with the counts.
    let mut args = collect_args(&c.extract, &c.store, &c.key);
    args.push("--accept-shrink".into());
    let o = gpdp().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(batch_of(&cut_code), cut_batch);
    let accepted = log_events(&c.store)
        .into_iter()
        .rfind(|e| e["event"] == "collect_accepted_shrink")
        .expect("the accepted shrink is in the audit log");
    assert!(
        accepted["patients_in"].as_u64().unwrap() < accepted["patients_in_force"].as_u64().unwrap()
    );
}

/// A provider file cut mid-line is held the same way (`gpdp link`), and
/// `link` into a path that is not a store refuses and creates nothing.
#[test]
fn a_cut_provider_file_is_held_and_link_needs_a_store() {
    let c = collected(2, 400, 63, 15);
    let link = |store: &Path, extra: &[&str]| {
        let mut args = vec![
            "link",
            "--extract",
            c.extract.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--key",
            c.key.to_str().unwrap(),
        ];
        args.extend(extra);
        run(&args)
    };
    let typo = c.store.with_file_name("stroe");
    let o = link(&typo, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not a gpdp store"), "{}", stderr(&o));
    assert!(!typo.exists(), "link created {}", typo.display());

    let o = link(&c.store, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let in_force = manifest(&c.store)["linked"]["apcs"].clone();
    let apcs = c.extract.join("linked/apcs.csv");
    let whole = std::fs::read(&apcs).unwrap();
    std::fs::write(&apcs, &whole[..whole.len() / 2 + 1]).unwrap();
    let o = link(&c.store, &[]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stdout(&o).contains("apcs: HELD by rule"), "{}", stdout(&o));
    assert_eq!(manifest(&c.store)["linked"]["apcs"], in_force);
    let o = link(&c.store, &["--accept-shrink"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(manifest(&c.store)["linked"]["apcs"], in_force);
}

/// A data file with one flipped byte (its footer intact) or cut short is
/// never read: `gpdp query` refuses with `store_corrupt` and names no file
/// to the researcher, the audit log names it to the operator, `gpdp serve`
/// will not start on it, and `gpdp audit` names it in
/// `files_match_manifest` and goes on (its data checks say why they did
/// not run). The untouched copy answers: the positive control.
#[test]
fn a_store_whose_bytes_differ_from_the_manifest_is_never_answered_from() {
    let c = collected_with_ndoo(2, 400, 64, 16);
    let sql = "SELECT sex, count(*) AS n FROM patients GROUP BY sex";
    let o = query(&c.store, sql);
    assert!(o.status.success(), "{}", stderr(&o));
    let rel = manifest(&c.store)["batches"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()["files"]["patients"]["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = c.store.join(&rel);
    let bytes = std::fs::read(&path).unwrap();
    let file_name = Path::new(&rel)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    for damage in ["flipped", "cut"] {
        let mut bad = bytes.clone();
        if damage == "flipped" {
            // A byte in the data pages, well before the footer.
            bad[bytes.len() / 3] ^= 0x5a;
        } else {
            bad.truncate(bytes.len() - 100);
        }
        std::fs::write(&path, &bad).unwrap();
        let o = query(&c.store, sql);
        assert_eq!(o.status.code(), Some(3), "{damage}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("refused by rule store_corrupt"),
            "{}",
            stderr(&o)
        );
        assert!(
            !stderr(&o).contains(&file_name),
            "the researcher was told the file"
        );
        let logged = log_events(&c.store)
            .into_iter()
            .rfind(|e| e["event"] == "store_corrupt")
            .unwrap();
        assert!(logged.to_string().contains(&file_name), "{logged}");

        let o = run(&[
            "serve",
            "--store",
            c.store.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ]);
        assert_eq!(o.status.code(), Some(3), "serve: {}", stderr(&o));
        assert!(stderr(&o).contains(&file_name), "{}", stderr(&o));

        let mut args = vec!["audit".to_owned(), "--json".to_owned()];
        args.extend(c.truth_args());
        let o = gpdp().args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(3), "audit: {}", stderr(&o));
        let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let checks = report["checks"].as_array().unwrap();
        let named = |n: &str| checks.iter().find(|c| c["name"] == n).unwrap().clone();
        let files = named("files_match_manifest");
        assert_eq!(files["passed"], false);
        assert!(
            files["detail"].as_str().unwrap().contains(&file_name),
            "{files}"
        );
        assert_eq!(named("audit_log_intact")["passed"], true);
        assert!(
            named("type1_patients_absent")["detail"]
                .as_str()
                .unwrap()
                .contains("not checked"),
        );
        let out = c.store.with_file_name(format!("report-{damage}"));
        let o = run(&[
            "report",
            "--store",
            c.store.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(3), "report: {}", stderr(&o));
        assert!(
            stderr(&o).contains("files_match_manifest") && stderr(&o).contains(&file_name),
            "{}",
            stderr(&o)
        );
    }
    std::fs::write(&path, &bytes).unwrap();
    let o = query(&c.store, sql);
    assert!(o.status.success(), "restored: {}", stderr(&o));
}

/// Runs a command whose reader goes away before reading anything.
fn into_closed_pipe(command: &mut std::process::Command) -> std::process::Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

/// A reader that stops early (`| head -c1`) never makes gpdp panic: the
/// command ends with the status of its work, and a collection whose
/// summary nobody read has still succeeded.
#[test]
fn a_closed_pipe_ends_a_command_quietly_with_the_status_of_its_work() {
    let c = collected_with_ndoo(2, 300, 65, 17);
    let store = c.store.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let extract = dir.path().join("extract");
    let nhs = Csv::read(&c.extract.join("truth/patients.csv")).records()[0]["nhs_number"].clone();
    let commands: Vec<(Vec<String>, i32)> = vec![
        (
            vec![
                "audit".into(),
                "--store".into(),
                store.into(),
                "--head".into(),
                "--json".into(),
            ],
            0,
        ),
        (
            vec![
                "audit".into(),
                "--store".into(),
                store.into(),
                "--verify-log".into(),
            ],
            0,
        ),
        (
            vec![
                "query".into(),
                "--store".into(),
                store.into(),
                "--project".into(),
                "demo-opensafely".into(),
                "--user".into(),
                "alice".into(),
                "--token".into(),
                "demo-alice-token".into(),
                "SELECT age_band, count(*) FROM patients GROUP BY age_band".into(),
            ],
            0,
        ),
        (
            vec![
                "synth".into(),
                "--out".into(),
                extract.to_str().unwrap().into(),
                "--practices".into(),
                "1".into(),
                "--patients".into(),
                "50".into(),
            ],
            0,
        ),
        (vec!["--help".into()], 0),
        (
            vec![
                "register".into(),
                "--store".into(),
                store.into(),
                "--out".into(),
                dir.path().join("register").to_str().unwrap().into(),
            ],
            0,
        ),
        (
            vec![
                "optout".into(),
                "status".into(),
                "--nhs-number".into(),
                nhs.clone(),
                "--store".into(),
                store.into(),
                "--key".into(),
                c.key.to_str().unwrap().into(),
                "--json".into(),
            ],
            0,
        ),
        // A command that fails says so whether or not anyone reads.
        (
            vec![
                "audit".into(),
                "--store".into(),
                "/nonexistent".into(),
                "--verify-log".into(),
            ],
            2,
        ),
    ];
    for (args, status) in commands {
        for _ in 0..3 {
            let o = into_closed_pipe(gpdp().args(&args));
            assert!(!stderr(&o).contains("panicked"), "{args:?}: {}", stderr(&o));
            assert_eq!(o.status.code(), Some(status), "{args:?}: {}", stderr(&o));
            if args[0] == "synth" {
                std::fs::remove_dir_all(&extract).unwrap();
            }
        }
    }
    // A collection whose reader left still commits, and says it succeeded.
    let o = into_closed_pipe(
        gpdp()
            .args(collect_args(&c.extract, &c.store, &c.key))
            .arg("--accept-shrink"),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// Every command's argument parsing, with nobody reading its output: its
/// help (exit 0) and an unknown flag (exit 2), each with stdout closed
/// before the command writes — never a panic, always the status of the
/// work. The commands are read from `gpdp --help`, so a new one is covered.
#[test]
fn every_command_parses_its_arguments_into_a_closed_pipe_without_panicking() {
    let help = run(&["--help"]);
    let text = stdout(&help);
    let commands: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        // A command's line; a long description wraps onto deeper lines.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    assert!(
        commands.len() >= 12,
        "commands in gpdp --help: {commands:?}"
    );
    let mut invocations: Vec<(Vec<String>, i32)> = Vec::new();
    for c in &commands {
        invocations.push((vec![c.clone(), "--help".into()], 0));
        invocations.push((vec![c.clone(), "--no-such-flag".into()], 2));
    }
    for sub in ["ingest", "apply", "status"] {
        invocations.push((vec!["optout".into(), sub.into(), "--help".into()], 0));
        invocations.push((
            vec!["optout".into(), sub.into(), "--no-such-flag".into()],
            2,
        ));
    }
    for (args, status) in invocations {
        let o = into_closed_pipe(gpdp().args(&args));
        assert!(!stderr(&o).contains("panicked"), "{args:?}: {}", stderr(&o));
        assert_eq!(o.status.code(), Some(status), "{args:?}: {}", stderr(&o));
    }
}

/// What the grammar cannot name still gets a rule: parentheses nested past
/// the SQL parser's limit are `outside_grammar/expression_depth`, and a
/// statement the planner would reject on its own (`INSERT … VALUES` into a
/// view) is `statement_not_allowed` — both exit 3, never a raw parser or
/// planner error.
#[test]
fn parser_and_planner_errors_outside_the_grammar_name_a_rule() {
    let c = collected_with_ndoo(2, 300, 66, 18);
    for (sql, rule) in [
        (
            format!(
                "SELECT count(*) FROM patients WHERE {}sex = 'F'{}",
                "(".repeat(60),
                ")".repeat(60)
            ),
            "outside_grammar (expression_depth)",
        ),
        (
            "INSERT INTO patients VALUES (1)".to_owned(),
            "statement_not_allowed",
        ),
        (
            "UPDATE patients SET sex = 'F'".to_owned(),
            "statement_not_allowed",
        ),
    ] {
        let o = query(&c.store, &sql);
        assert_eq!(o.status.code(), Some(3), "{sql}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("refused by rule {rule}")),
            "{sql}: {}",
            stderr(&o)
        );
    }
    // The positive control: nesting the parser takes is answered.
    let sql = format!(
        "SELECT count(*) FROM patients WHERE {}sex = 'F'{}",
        "(".repeat(10),
        ")".repeat(10)
    );
    let o = query(&c.store, &sql);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Every rule a refusal or hold can name is listed in the table of rules
/// in docs/boundary.md with its exit status: the rule names are read from
/// the source (`Refusal::new("…"` and `rule: "…"`; the constructs under
/// `outside_grammar` are listed with the grammar), so a new rule that
/// nobody documented fails here.
#[test]
fn every_rule_the_code_can_name_is_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let boundary = std::fs::read_to_string(root.join("docs/boundary.md")).unwrap();
    // The table itself, not a mention elsewhere on the page.
    let table: String = boundary
        .split("| rule | where | what refused or held |")
        .nth(1)
        .expect("docs/boundary.md has the table of rules")
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut rules = std::collections::BTreeSet::new();
    let mut stack = vec![root.join("src")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            for opener in ["Refusal::new(", "rule: "] {
                let mut rest = text.as_str();
                while let Some(at) = rest.find(opener) {
                    rest = &rest[at + opener.len()..];
                    let trimmed = rest.trim_start();
                    if let Some(quoted) = trimmed.strip_prefix('"') {
                        let name: String = quoted.chars().take_while(|c| *c != '"').collect();
                        if !name.is_empty()
                            && name.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        {
                            rules.insert(name);
                        }
                    }
                }
            }
        }
    }
    assert!(
        rules.len() >= 25,
        "found only {} rules: {rules:?}",
        rules.len()
    );
    for must in [
        "store_corrupt",
        "shrink",
        "truncated",
        "budget_exhausted",
        "statement_not_allowed",
    ] {
        assert!(rules.contains(must), "{must} not found in the source");
    }
    let missing: Vec<&String> = rules
        .iter()
        .filter(|r| !table.contains(&format!("`{r}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "rules the code can name but the table of rules in docs/boundary.md does not list: {missing:?}"
    );
}
