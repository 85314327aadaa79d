//! The TRE boundary: every case of `tests/tre_cases.tsv`, the opt-out
//! filters against the generator's truth, authentication, and the audit
//! trail of every request.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use common::*;
use gpdp::policy::tre::TrePolicy;
use gpdp::tre::{Request, TreError, query_blocking};

/// One extract collected once, with the NDOO list ingested.
fn fixture() -> &'static Collected {
    static F: OnceLock<Collected> = OnceLock::new();
    F.get_or_init(|| collected_with_ndoo(3, 2000, 21, 9))
}

fn ask(project: &str, sql: &str) -> Result<gpdp::tre::Released, TreError> {
    let policy = TrePolicy::load(None).unwrap();
    query_blocking(
        &policy,
        &Request {
            store: fixture().store.clone(),
            user: "alice".into(),
            token: Some("demo-alice-token".into()),
            project: project.into(),
            sql: sql.into(),
        },
    )
}

#[test]
fn every_boundary_case_has_its_expected_outcome() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tre_cases.tsv"))
            .unwrap();
    let mut failures = Vec::new();
    let mut cases = 0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let parts: Vec<&str> = line.splitn(4, '\t').collect();
        let [project, expected, rule, sql] = parts[..] else {
            panic!("bad case line: {line}")
        };
        cases += 1;
        let project = match project {
            "exempt" => "demo-planning-exempt",
            "acro" => "demo-prescribing-acro",
            _ => "demo-research",
        };
        let got = match ask(project, sql) {
            Ok(r) => {
                // Every released count is a multiple of 5.
                for (i, kind) in r.kinds.iter().enumerate() {
                    if *kind == gpdp::tre::sdc::ColumnKind::Count {
                        let c = r.result.batch.column(i).as_primitive::<Int64Type>();
                        for v in c.iter().flatten() {
                            if v % 5 != 0 {
                                failures.push(format!(
                                    "{sql}: released count {v} is not a multiple of 5"
                                ));
                            }
                        }
                    }
                }
                ("released".to_owned(), "-".to_owned())
            }
            Err(TreError::Refused(r)) => ("refused".to_owned(), r.rule.to_owned()),
            Err(TreError::Sql(_)) => ("error".to_owned(), "-".to_owned()),
            Err(other) => (format!("failed: {other}"), "-".to_owned()),
        };
        if (got.0.as_str(), got.1.as_str()) != (expected, rule) {
            failures.push(format!(
                "{sql}\n    expected {expected} {rule}, got {} {}",
                got.0, got.1
            ));
        }
    }
    assert!(cases >= 50, "at least 50 boundary cases ({cases})");
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// Counts through the research project's views equal the truth with NDOO
/// patients removed; the exempt project sees them.
#[test]
fn ndoo_patients_are_removed_for_research_only() {
    let f = fixture();
    let truth = Csv::read(&f.extract.join("truth/patients.csv")).records();
    let dissenting: std::collections::HashSet<&String> = truth
        .iter()
        .filter(|r| r["type1_at_extract"] == "true")
        .map(|r| &r["nhs_number"])
        .collect();
    let mut expected: HashMap<(bool, String), std::collections::HashSet<&String>> = HashMap::new();
    for r in &truth {
        if dissenting.contains(&r["nhs_number"]) {
            continue;
        }
        for with_ndoo in [true, false] {
            if with_ndoo || r["ndoo"] == "false" {
                expected
                    .entry((with_ndoo, r["sex"].clone()))
                    .or_default()
                    .insert(&r["nhs_number"]);
            }
        }
    }
    let round = |n: usize| gpdp::tre::sdc::round(n as i64, 5);
    for (project, with_ndoo) in [("demo-research", false), ("demo-planning-exempt", true)] {
        let r = ask(
            project,
            "SELECT sex, count(DISTINCT patient_id) AS n FROM patients GROUP BY sex ORDER BY sex",
        )
        .unwrap();
        let b = &r.result.batch;
        let sexes = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let sexes = sexes.as_string::<i32>();
        let counts = b.column(1).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            let want = round(expected[&(with_ndoo, sexes.value(i).to_owned())].len());
            assert_eq!(counts.value(i), want, "{project} sex {}", sexes.value(i));
        }
    }
    let research = ask(
        "demo-research",
        "SELECT count(DISTINCT patient_id) FROM patients",
    )
    .unwrap();
    let exempt = ask(
        "demo-planning-exempt",
        "SELECT count(DISTINCT patient_id) FROM patients",
    )
    .unwrap();
    let n = |r: &gpdp::tre::Released| {
        r.result
            .batch
            .column(0)
            .as_primitive::<Int64Type>()
            .value(0)
    };
    assert!(
        n(&exempt) - n(&research) > 50,
        "the NDOO removes patients for research: {} vs {}",
        n(&research),
        n(&exempt)
    );
}

/// Small cells are suppressed (never released from 1..=7 patients) and say why.
#[test]
fn small_cells_are_suppressed_with_a_reason() {
    let r = ask("demo-research", "SELECT age_band, sex, ethnicity, imd_decile, count(*) AS n FROM patients GROUP BY age_band, sex, ethnicity, imd_decile").unwrap();
    assert!(
        r.result.suppressed_cells > 0,
        "rare combinations exist in the test data"
    );
    let n = r.result.batch.column(4);
    for (i, s) in r.result.suppressed.iter().enumerate() {
        assert_eq!(s.is_some(), n.is_null(i));
        if let Some(reason) = s {
            assert!(reason.contains("opensafely"), "{reason}");
        }
    }
    let csv = gpdp::tre::to_csv(&r.result);
    assert!(csv.contains("[REDACTED]"));
}

#[test]
fn the_command_line_refuses_with_exit_3_and_logs_everything() {
    let f = fixture();
    let store = f.store.to_str().unwrap();
    let query = |user: &str, token: Option<&str>, project: &str, sql: &str| {
        let mut cmd = gpdp();
        cmd.args([
            "query",
            "--store",
            store,
            "--project",
            project,
            "--user",
            user,
            sql,
        ])
        .env_remove("GPDP_TOKEN");
        if let Some(t) = token {
            cmd.env("GPDP_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let before = std::fs::read_to_string(f.store.join("audit/log.jsonl"))
        .unwrap()
        .lines()
        .count();
    let ok = query(
        "alice",
        Some("demo-alice-token"),
        "demo-research",
        "SELECT sex, count(*) AS n FROM patients GROUP BY sex",
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stdout(&ok).contains("disclosure control opensafely"));
    for (user, token, project, sql, rule) in [
        (
            "alice",
            Some("wrong-token"),
            "demo-research",
            "SELECT count(*) FROM patients",
            "authentication",
        ),
        (
            "alice",
            None,
            "demo-research",
            "SELECT count(*) FROM patients",
            "authentication",
        ),
        (
            "bob",
            Some("demo-bob-token"),
            "demo-research",
            "SELECT count(*) FROM patients",
            "safe_people",
        ),
        (
            "alice",
            Some("demo-alice-token"),
            "no-such-project",
            "SELECT count(*) FROM patients",
            "safe_projects",
        ),
        (
            "alice",
            Some("demo-alice-token"),
            "demo-research",
            "SELECT * FROM patients",
            "not_an_aggregate",
        ),
    ] {
        let o = query(user, token, project, sql);
        assert_eq!(
            o.status.code(),
            Some(3),
            "{user} {project} {sql}: {}",
            stderr(&o)
        );
        assert!(stderr(&o).contains(rule), "{}", stderr(&o));
        assert!(!stderr(&o).contains(store), "no paths in refusals");
    }
    let log = std::fs::read_to_string(f.store.join("audit/log.jsonl")).unwrap();
    let new: Vec<&str> = log.lines().skip(before).collect();
    assert!(new.len() >= 6, "every request is logged ({})", new.len());
    assert!(
        new.iter()
            .any(|l| l.contains("\"outcome\":\"released\"") && l.contains("result_sha256"))
    );
    assert!(
        new.iter()
            .filter(|l| l.contains("\"outcome\":\"refused\""))
            .count()
            >= 5
    );
    assert!(
        !log.contains("demo-alice-token"),
        "tokens never reach the log"
    );
    // The chain still verifies.
    let o = run(&["audit", "--store", store, "--verify-log"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Editing one byte of the audit log makes verification fail and name the line.
#[test]
fn an_edited_audit_log_fails_verification_naming_the_line() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("store");
    std::fs::create_dir_all(copy.join("audit")).unwrap();
    std::fs::copy(f.store.join("manifest.json"), copy.join("manifest.json")).unwrap();
    let log = std::fs::read_to_string(f.store.join("audit/log.jsonl")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 2);
    let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    edited[1] = edited[1].replacen("\"event\":\"", "\"event\":\"x", 1);
    std::fs::write(copy.join("audit/log.jsonl"), edited.join("\n") + "\n").unwrap();
    let o = run(&["audit", "--store", copy.to_str().unwrap(), "--verify-log"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("line 2"), "{}", stderr(&o));
}

#[test]
fn a_path_that_is_not_a_store_is_a_usage_error_and_gains_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_store = dir.path().join("elsewhere");
    let o = query_as_alice(
        &not_a_store,
        &["SELECT sex, count(*) FROM patients GROUP BY sex"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not a gpdp store"), "{}", stderr(&o));
    assert!(
        !not_a_store.exists(),
        "the query created {}",
        not_a_store.display()
    );
}

/// A differencing attack: weight one patient so heavily that a sum reveals
/// them. A threshold-only rule set (OpenSAFELY) releases the sum (the cell
/// has many patients); the ACRO rule set's dominance checks suppress it and
/// say which rule did.
#[test]
fn dominance_rules_stop_a_sum_that_singles_out_one_patient() {
    let store = &fixture().store;
    let keys: Vec<i64> = read_table(store, "patients")
        .iter()
        .flat_map(|b| {
            b.column_by_name("patient_key")
                .unwrap()
                .as_primitive::<Int64Type>()
                .values()
                .to_vec()
        })
        .take(20)
        .collect();
    let sql = |k: i64| {
        format!(
            "SELECT sex, count(*) AS n, sum(CASE WHEN patient_key = {k} THEN 1000000 ELSE 1 END) AS s \
             FROM patients GROUP BY sex"
        )
    };
    // A patient the research views include (not NDOO): their sex's sum exceeds a million.
    let (key, sex) = keys
        .iter()
        .find_map(|&k| {
            let r = ask("demo-research", &sql(k)).unwrap();
            let b = &r.result.batch;
            let s = b.column(2).as_primitive::<Int64Type>();
            (0..b.num_rows())
                .find(|&i| s.is_valid(i) && s.value(i) > 1_000_000)
                .map(|i| (k, text(b, 0, i)))
        })
        .expect("one of 20 patients is outside the NDOO");
    let r = ask("demo-prescribing-acro", &sql(key)).unwrap();
    let b = &r.result.batch;
    let row = (0..b.num_rows()).find(|&i| text(b, 0, i) == sex).unwrap();
    assert!(b.column(2).is_null(row), "the dominated sum was released");
    let reason = r.result.suppressed[row].as_deref().unwrap();
    assert!(reason.contains("acro: dominance"), "{reason}");
}

fn text(b: &arrow::array::RecordBatch, col: usize, row: usize) -> String {
    let f = arrow::util::display::ArrayFormatter::try_new(
        b.column(col).as_ref(),
        &arrow::util::display::FormatOptions::default(),
    )
    .unwrap();
    f.value(row).to_string()
}
