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
use gpdp::tre::sdc::ColumnKind;
use gpdp::tre::{Request, TreError, query_blocking};

/// One extract collected once, with the NDOO list ingested.
fn fixture() -> &'static Collected {
    static F: OnceLock<Collected> = OnceLock::new();
    F.get_or_init(|| collected_with_ndoo(3, 2000, 21, 9))
}

/// The shipped policy, with a perturbation key for the cell key method and
/// a privacy budget no test here runs out of.
fn test_policy() -> TrePolicy {
    let mut policy = TrePolicy::load(None).unwrap();
    policy.record_keys = Some(gpdp::tre::ckm::RecordKeys::from_bytes(&[3; 32]));
    for r in &mut policy.researchers {
        r.rho_budget = 1e9;
    }
    policy
}

fn ask(project: &str, sql: &str) -> Result<gpdp::tre::Released, TreError> {
    let policy = test_policy();
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
        // `outside_grammar/<construct>` names the rule and the construct.
        let [project, expected, rule, sql] = parts[..] else {
            panic!("bad case line: {line}")
        };
        cases += 1;
        let project = match project {
            "exempt" => "demo-planning-exempt",
            "acro" => "demo-prescribing-acro",
            "dp" => "demo-research",
            _ => "demo-opensafely",
        };
        let got = match ask(project, sql) {
            Ok(r) => {
                // Every released count is a multiple of 5 (where counts are rounded).
                for (i, kind) in r.kinds().iter().enumerate() {
                    if *kind == gpdp::tre::sdc::ColumnKind::Count && r.disclosure.round_to == 5 {
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
            Err(TreError::Refused(r)) => (
                "refused".to_owned(),
                match r.construct {
                    Some(c) => format!("{}/{c}", r.rule),
                    None => r.rule.to_owned(),
                },
            ),
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
    assert!(cases >= 150, "at least 150 boundary cases ({cases})");
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
    for (project, with_ndoo) in [("demo-opensafely", false), ("demo-planning-exempt", true)] {
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
            let exact = expected[&(with_ndoo, sexes.value(i).to_owned())].len();
            let got = counts.value(i);
            // The exempt project is under the cell key method: within ±5.
            if r.disclosure.ckm.is_some() {
                assert!(
                    (got - exact as i64).abs() <= 5,
                    "{project}: {got} vs {exact}"
                );
            } else {
                assert_eq!(got, round(exact), "{project} sex {}", sexes.value(i));
            }
        }
    }
    let research = ask(
        "demo-opensafely",
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

/// Small statistics are redacted (never released from 0..=7 patients), each
/// on its own, and rows with nothing releasable are withheld without a trace.
#[test]
fn small_statistics_are_redacted_and_empty_rows_withheld() {
    let r = ask("demo-opensafely", "SELECT age_band, sex, ethnicity, imd_decile, count(*) AS n FROM patients GROUP BY age_band, sex, ethnicity, imd_decile").unwrap();
    let c = &r.result;
    assert!(
        c.operator.withheld_rows > 0,
        "rare combinations exist in the test data"
    );
    assert_eq!(c.redacted_cells, 0, "the only statistic of a withheld row");
    assert_eq!(c.batch.column(4).null_count(), 0);
    let csv = gpdp::tre::to_csv(c);
    assert!(!csv.contains("[REDACTED]"));
    // Two statistics with different contributors: the second is redacted
    // on its own where few patients contribute to it.
    let r = ask(
        "demo-opensafely",
        "SELECT age_band, count(*) AS n, count(*) FILTER (WHERE ethnicity = 'Other') AS other FROM patients GROUP BY age_band",
    )
    .unwrap();
    let c = &r.result;
    assert!(c.redacted_cells > 0, "{}", gpdp::tre::to_csv(c));
    assert_eq!(
        c.batch.column(1).null_count(),
        0,
        "n is large in every band"
    );
    assert!(gpdp::tre::to_csv(c).contains("[REDACTED]"));
    let json = gpdp::tre::to_json(&r).to_string();
    assert!(!json.contains("withheld"), "{json}");
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
        "demo-opensafely",
        "SELECT sex, count(*) AS n FROM patients GROUP BY sex",
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stdout(&ok).contains("disclosure control opensafely"));
    for (user, token, project, sql, rule) in [
        (
            "alice",
            Some("wrong-token"),
            "demo-opensafely",
            "SELECT count(*) FROM patients",
            "authentication",
        ),
        (
            "alice",
            None,
            "demo-opensafely",
            "SELECT count(*) FROM patients",
            "authentication",
        ),
        (
            "bob",
            Some("demo-bob-token"),
            "demo-opensafely",
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
            "demo-opensafely",
            "SELECT * FROM patients",
            "outside_grammar (not_an_aggregate)",
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

/// ACRO's dominance rules run over patients: each released sum of the ACRO
/// project, checked against the store itself (each patient's total computed
/// here, independently), has no two patients making up more than 90% of it
/// and passes the p% rule; and the rules did redact something.
#[test]
fn acro_sums_pass_dominance_over_patients_checked_against_the_store() {
    let store = &fixture().store;
    let r = ask(
        "demo-prescribing-acro",
        "SELECT dmd_code, sum(quantity) AS total FROM medications GROUP BY dmd_code",
    )
    .unwrap();
    // Per code, per patient: their total quantity.
    let mut per: HashMap<String, HashMap<i64, f64>> = HashMap::new();
    let ndoo: std::collections::HashSet<i64> = ndoo_keys(store);
    for b in read_table(store, "medications") {
        let keys = b
            .column_by_name("patient_key")
            .unwrap()
            .as_primitive::<Int64Type>();
        let code = arrow::compute::cast(
            b.column_by_name("dmd_code").unwrap(),
            &arrow::datatypes::DataType::Utf8,
        )
        .unwrap();
        let code = code.as_string::<i32>();
        let q = b
            .column_by_name("quantity")
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>();
        for i in 0..b.num_rows() {
            if ndoo.contains(&keys.value(i)) || q.is_null(i) {
                continue;
            }
            *per.entry(code.value(i).to_owned())
                .or_default()
                .entry(keys.value(i))
                .or_default() += q.value(i);
        }
    }
    let b = &r.result.batch;
    let totals = b.column(1).as_primitive::<arrow::datatypes::Float64Type>();
    let mut released = 0;
    for i in 0..b.num_rows() {
        if totals.is_null(i) {
            continue;
        }
        released += 1;
        let mut c: Vec<f64> = per[&text(b, 0, i)].values().copied().collect();
        c.sort_by(|a, b| b.total_cmp(a));
        let total: f64 = c.iter().sum();
        assert!((total - totals.value(i)).abs() < 1e-6 * total.max(1.0));
        assert!(c.len() >= 10, "{} patients", c.len());
        assert!(
            c[0] + c[1] <= 0.9 * total,
            "N-K broken for {}",
            text(b, 0, i)
        );
        assert!(
            total - c[0] - c[1] >= 0.1 * c[0],
            "p% broken for {}",
            text(b, 0, i)
        );
    }
    assert!(released > 3);
    // Codes where one patient dominates exist in the data and are held back.
    let dominated = per
        .iter()
        .filter(|(_, p)| {
            let mut c: Vec<f64> = p.values().copied().collect();
            c.sort_by(|a, b| b.total_cmp(a));
            let total: f64 = c.iter().sum();
            c.len() >= 10 && c[0] + c.get(1).copied().unwrap_or(0.0) > 0.9 * total
        })
        .count();
    let shown = (0..b.num_rows()).filter(|&i| totals.is_valid(i)).count();
    assert!(shown + dominated <= per.len());
}

/// Legitimate questions answer with the truth: every released count is the
/// true count (the same SQL run directly over the project's views) rounded,
/// every released mean is the true sum over its count of values as
/// released — rounded (the column before it: a mean from the exact count
/// would give that count away) — nothing is invented, and patient
/// counts above the threshold are never lost. (A compiler that turned
/// `count(DISTINCT ..) FILTER (..)` into a count of rows passed every
/// privacy check and released numbers 10% too high.)
#[test]
fn released_statistics_are_the_truth_rounded() {
    // (sql, statistics that count distinct patients)
    let panel: &[(&str, &[usize])] = &[
        (
            "SELECT p.age_band, count(DISTINCT d.patient_id) AS n FROM patients p \
             LEFT JOIN (SELECT patient_id FROM clinical_events WHERE snomedct_code IN ('44054006', '46635009', '73211009')) d \
             ON p.patient_id = d.patient_id GROUP BY p.age_band",
            &[1],
        ),
        (
            "SELECT imd_decile, count(*) AS n, count(DISTINCT patient_id) AS people FROM patients \
             WHERE patient_id IN (SELECT patient_id FROM clinical_events WHERE snomedct_code IN ('44054006', '46635009', '73211009')) \
             GROUP BY imd_decile",
            &[2],
        ),
        (
            "SELECT age_band, count(DISTINCT patient_id) FILTER (WHERE sex = 'F') AS women, \
             count(DISTINCT patient_id) AS everyone FROM patients GROUP BY age_band",
            &[1, 2],
        ),
        (
            "SELECT p.age_band, count(c.numeric_value) AS tests, avg(c.numeric_value) AS mean, \
             count(c.numeric_value) FILTER (WHERE c.numeric_value > 48) AS high \
             FROM clinical_events c JOIN patients p ON c.patient_id = p.patient_id \
             WHERE c.snomedct_code = '999791000000106' GROUP BY p.age_band",
            &[],
        ),
        (
            "SELECT event_year, count(*) AS n, count(DISTINCT patient_id) AS people FROM clinical_events \
             WHERE event_year >= 2015 GROUP BY event_year",
            &[2],
        ),
    ];
    let policy = TrePolicy::load(None).unwrap();
    let project = &policy.projects["demo-opensafely"];
    let store = &fixture().store;
    for &(sql, patient_counts) in panel {
        let released = ask("demo-opensafely", sql).unwrap();
        let rules = &released.disclosure;
        let truth = direct(store, &policy, project, sql);
        let b = &released.result.batch;
        let kinds = released.kinds();
        let keys = kinds.iter().take_while(|k| **k == ColumnKind::Key).count();
        let row_key = |b: &arrow::array::RecordBatch, i: usize| -> String {
            (0..keys)
                .map(|c| text(b, c, i))
                .collect::<Vec<_>>()
                .join("|")
        };
        let truth_rows: HashMap<String, usize> = (0..truth.num_rows())
            .map(|i| (row_key(&truth, i), i))
            .collect();
        let released_rows: HashMap<String, usize> =
            (0..b.num_rows()).map(|i| (row_key(b, i), i)).collect();
        for key in released_rows.keys() {
            assert!(truth_rows.contains_key(key), "{sql}: invented row {key}");
        }
        let mut shown = 0;
        for (key, &t) in &truth_rows {
            let r = released_rows.get(key).copied();
            for (c, kind) in kinds.iter().enumerate().skip(keys) {
                let cell = r.filter(|&r| b.column(c).is_valid(r));
                match kind {
                    ColumnKind::Count => {
                        let want = truth.column(c).as_primitive::<Int64Type>().value(t);
                        let small = want <= rules.redact_at_or_below as i64;
                        match cell {
                            Some(r) => {
                                shown += 1;
                                let got = b.column(c).as_primitive::<Int64Type>().value(r);
                                assert!(!small, "{sql}: {key} col {c}: {want} released");
                                assert_eq!(
                                    got,
                                    gpdp::tre::sdc::round(want, rules.round_to),
                                    "{sql}: {key} col {c}: truth {want}"
                                );
                            }
                            None => assert!(
                                small || !patient_counts.contains(&c),
                                "{sql}: {key} col {c}: {want} patients lost"
                            ),
                        }
                    }
                    ColumnKind::Statistic => {
                        if let Some(r) = cell {
                            let n = truth.column(c - 1).as_primitive::<Int64Type>().value(t);
                            let released_n = gpdp::tre::sdc::round(n, rules.round_to);
                            let want = truth
                                .column(c)
                                .as_primitive::<arrow::datatypes::Float64Type>()
                                .value(t)
                                * n as f64
                                / released_n as f64;
                            let got = b
                                .column(c)
                                .as_primitive::<arrow::datatypes::Float64Type>()
                                .value(r);
                            assert!(
                                (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                                "{sql}: {key} col {c}: {got} vs {want}"
                            );
                        }
                    }
                    ColumnKind::Key => unreachable!("keys come first"),
                }
            }
        }
        assert!(shown > 3, "{sql}: too little released to check");
    }
}

/// The cell key method: counts within ±D of the truth, never small, the
/// same answer every time for the same key, different under another key;
/// refused without the key and for variances.
#[test]
fn ckm_counts_are_noisy_bounded_and_the_same_every_time() {
    use gpdp::tre::ckm::RecordKeys;
    let sql = "SELECT age_band, sex, imd_decile, count(DISTINCT patient_id) AS n, count(*) AS rows \
               FROM patients GROUP BY age_band, sex, imd_decile";
    let store = &fixture().store;
    let request = |sql: &str| Request {
        store: store.clone(),
        user: "alice".into(),
        token: Some("demo-alice-token".into()),
        project: "demo-planning-exempt".into(),
        sql: sql.into(),
    };
    let without = TrePolicy::load(None).unwrap();
    match query_blocking(&without, &request(sql)) {
        Err(TreError::Refused(r)) => assert_eq!(r.rule, "no_perturbation_key"),
        other => panic!("{other:?}"),
    }
    let with = |byte: u8| {
        let mut p = TrePolicy::load(None).unwrap();
        p.record_keys = Some(RecordKeys::from_bytes(&[byte; 32]));
        p
    };
    let (one, other) = (with(7), with(8));
    match query_blocking(
        &one,
        &request(
            "SELECT sex, stddev(numeric_value) FROM clinical_events c JOIN patients p ON c.patient_id = p.patient_id GROUP BY sex",
        ),
    ) {
        Err(TreError::Refused(r)) => assert_eq!(r.rule, "statistic_not_available"),
        other => panic!("{other:?}"),
    }
    let a = query_blocking(&one, &request(sql)).unwrap();
    let again = query_blocking(&one, &request(sql)).unwrap();
    let b = query_blocking(&other, &request(sql)).unwrap();
    assert_eq!(a.result.batch, again.result.batch, "same key, same answer");
    assert_ne!(
        a.result.batch, b.result.batch,
        "the noise depends on the key"
    );
    // Against the same SQL run directly.
    let policy = &one;
    let truth = direct(store, policy, &policy.projects["demo-planning-exempt"], sql);
    let key = |b: &arrow::array::RecordBatch, i: usize| {
        (0..3).map(|c| text(b, c, i)).collect::<Vec<_>>().join("|")
    };
    let truth_at: HashMap<String, usize> =
        (0..truth.num_rows()).map(|i| (key(&truth, i), i)).collect();
    let rb = &a.result.batch;
    let (mut moved, mut checked) = (0, 0);
    for i in 0..rb.num_rows() {
        let t = truth_at[&key(rb, i)];
        for c in [3, 4] {
            let col = rb.column(c).as_primitive::<Int64Type>();
            if col.is_null(i) {
                continue;
            }
            let got = col.value(i);
            let want = truth.column(c).as_primitive::<Int64Type>().value(t);
            assert!((got - want).abs() <= 5, "{}: {got} vs {want}", key(rb, i));
            assert!(got > 7, "{}: {got} released", key(rb, i));
            checked += 1;
            moved += usize::from(got != want);
        }
    }
    assert!(checked > 50, "{checked}");
    // V = 3 over -5..=5: P(v = 0) is 0.23 for large counts.
    assert!(moved * 2 > checked, "{moved} of {checked} moved");
}

/// The cell key method on sums and means: each sum is off the truth by a
/// quarter to three quarters of the cell's largest contribution (m = 0.5),
/// each mean is a noisy sum over a noisy count, and the same question gets
/// the same answer every time.
#[test]
fn ckm_sums_and_means_carry_noise_scaled_to_the_largest_contribution() {
    let policy = test_policy();
    let store = &fixture().store;
    let project = &policy.projects["demo-planning-exempt"];
    let from = "FROM clinical_events c JOIN patients p ON c.patient_id = p.patient_id \
                WHERE c.snomedct_code = '999791000000106'";
    let sql = format!(
        "SELECT p.sex, p.age_band, count(c.numeric_value) AS n, sum(c.numeric_value) AS total, \
         avg(c.numeric_value) AS mean {from} GROUP BY p.sex, p.age_band"
    );
    let a = ask("demo-planning-exempt", &sql).unwrap();
    assert_eq!(
        a.result.batch,
        ask("demo-planning-exempt", &sql).unwrap().result.batch
    );
    // A count asked alone (one aggregate per cell) is the same count as
    // next to a sum (aggregated by patient first): the same cell key.
    let alone = ask(
        "demo-planning-exempt",
        &format!(
            "SELECT p.sex, p.age_band, count(c.numeric_value) AS n {from} GROUP BY p.sex, p.age_band"
        ),
    )
    .unwrap()
    .result
    .batch;
    assert_eq!(alone.column(2), a.result.batch.column(2));
    let truth = direct(
        store,
        &policy,
        project,
        &format!(
            "SELECT p.sex, p.age_band, count(c.numeric_value), sum(c.numeric_value) {from} \
             GROUP BY p.sex, p.age_band"
        ),
    );
    let largest = direct(
        store,
        &policy,
        project,
        &format!(
            "SELECT sex, age_band, max(t) FROM (SELECT p.sex, p.age_band, c.patient_id, \
             sum(c.numeric_value) AS t {from} GROUP BY p.sex, p.age_band, c.patient_id) \
             GROUP BY sex, age_band"
        ),
    );
    let key =
        |b: &arrow::array::RecordBatch, i: usize| format!("{}|{}", text(b, 0, i), text(b, 1, i));
    let at = |b: &arrow::array::RecordBatch| -> HashMap<String, usize> {
        (0..b.num_rows()).map(|i| (key(b, i), i)).collect()
    };
    let (truth_at, largest_at) = (at(&truth), at(&largest));
    let real = |b: &arrow::array::RecordBatch, c: usize, i: usize| {
        arrow::compute::cast(b.column(c), &arrow::datatypes::DataType::Float64)
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>()
            .value(i)
    };
    let rb = &a.result.batch;
    let mut checked = 0;
    for i in 0..rb.num_rows() {
        if rb.column(3).is_null(i) {
            continue;
        }
        let k = key(rb, i);
        let (t, top) = (truth_at[&k], real(&largest, 2, largest_at[&k]));
        let (n, total, mean) = (real(rb, 2, i), real(rb, 3, i), real(rb, 4, i));
        let (true_n, true_total) = (real(&truth, 2, t), real(&truth, 3, t));
        let error = (total - true_total).abs();
        assert!(
            (0.25 * top - 1e-9..0.75 * top + 1e-9).contains(&error),
            "{k}: sum off by {error}, largest contribution {top}"
        );
        assert!((n - true_n).abs() <= 5.0, "{k}: count {n}");
        // The mean: the sum's noise over a count perturbed by at most 5.
        let true_mean = true_total / true_n;
        let bound = (0.75 * top + 5.0 * true_mean) / (true_n - 5.0);
        assert!(
            (mean - true_mean).abs() <= bound,
            "{k}: mean {mean} vs {true_mean}"
        );
        checked += 1;
    }
    assert!(checked >= 6, "{checked} cells checked");
}

/// Differencing one patient's test out of a cell: the same cell asked up
/// to a date and up to the day before, where only one patient has a test
/// that day. Under OpenSAFELY's rules the sums' difference is the
/// patient's value exactly (why deterministic rules need output checking).
/// Under the cell key method the patient is in both cells (with earlier
/// tests), so a cell key of *who* contributes would be the same and the
/// difference exact too; keyed by how much each contributes, both counts
/// and sums draw fresh noise: the count comes out exact only as often as
/// two independent perturbations agree (about 0.2 here), and the sum is off
/// by more than a tenth of the value nearly always.
#[test]
fn ckm_differencing_one_patients_row_draws_fresh_noise() {
    let policy = test_policy();
    let store = &fixture().store;
    let from = "FROM clinical_events c JOIN patients p ON c.patient_id = p.patient_id \
                WHERE c.snomedct_code = '999791000000106' AND p.sex = 'M'";
    // Days with one patient's tests, who also had a test before, the same
    // in both projects' views (the patient has not opted out).
    let days_in = |project: &str| -> Vec<(String, i64, f64)> {
        let b = direct(
            store,
            &policy,
            &policy.projects[project],
            &format!(
                "SELECT d.date, d.rows, d.v FROM (SELECT c.date, count(DISTINCT c.patient_id) AS n, \
                 count(*) AS rows, sum(c.numeric_value) AS v, min(c.patient_key) AS who {from} \
                 GROUP BY c.date) d WHERE d.n = 1 AND d.date > '2015-01-01' AND EXISTS (SELECT 1 \
                 FROM clinical_events e WHERE e.patient_key = d.who AND e.date < d.date AND \
                 e.snomedct_code = '999791000000106') ORDER BY d.date"
            ),
        );
        (0..b.num_rows())
            .map(|i| {
                (
                    text(&b, 0, i),
                    b.column(1).as_primitive::<Int64Type>().value(i),
                    b.column(2)
                        .as_primitive::<arrow::datatypes::Float64Type>()
                        .value(i),
                )
            })
            .collect()
    };
    let visible = days_in("demo-opensafely");
    let days: Vec<(String, i64, f64)> = days_in("demo-planning-exempt")
        .into_iter()
        .filter(|d| visible.contains(d))
        .step_by(3)
        .take(20)
        .collect();
    assert!(days.len() >= 12, "{} days", days.len());
    let released = |project: &str, sql: String, column: usize| -> f64 {
        let b = ask(project, &sql).unwrap().result.batch;
        assert_eq!(b.num_rows(), 1, "{sql}");
        arrow::compute::cast(b.column(column), &arrow::datatypes::DataType::Float64)
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>()
            .value(0)
    };
    let (mut exact_counts, mut close_sums) = (0, 0);
    for (day, rows, value) in &days {
        let up_to = |op: &str, project: &str, stat: &str| {
            released(
                project,
                format!("SELECT {stat} AS x {from} AND c.date {op} '{day}'"),
                0,
            )
        };
        let diff =
            |project: &str, stat: &str| up_to("<=", project, stat) - up_to("<", project, stat);
        // The attack, where it works.
        let exact = diff("demo-opensafely", "sum(c.numeric_value)");
        assert!((exact - value).abs() < 1e-6, "{day}: {exact} vs {value}");
        // Closed for counts of rows (one aggregate per cell) and for sums.
        exact_counts += usize::from(diff("demo-planning-exempt", "count(*)") == *rows as f64);
        let error = (diff("demo-planning-exempt", "sum(c.numeric_value)") - value).abs();
        close_sums += usize::from(error < 0.1 * value);
    }
    let n = days.len();
    assert!(
        exact_counts * 2 <= n,
        "{exact_counts} of {n} row counts differenced exactly"
    );
    assert!(
        close_sums * 5 <= n,
        "{close_sums} of {n} values recovered within 10%"
    );
}

/// The same SQL run directly over a project's views, without the boundary:
/// the truth the boundary's answers are checked against.
fn direct(
    store: &Path,
    policy: &TrePolicy,
    project: &gpdp::policy::tre::Project,
    sql: &str,
) -> arrow::array::RecordBatch {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let manifest = gpdp::store::read_manifest(store).unwrap();
    let batches = runtime
        .block_on(async {
            let ctx = gpdp::tre::session::open(store, &manifest, policy, project)
                .await
                .unwrap()
                .ctx;
            ctx.sql(sql).await?.collect().await
        })
        .unwrap();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

fn ndoo_keys(store: &Path) -> std::collections::HashSet<i64> {
    let m = manifest(store);
    let path = store.join(m["ndoo"]["path"].as_str().unwrap());
    let file = std::fs::File::open(path).unwrap();
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .flat_map(|b| {
            let b = b.unwrap();
            b.column_by_name("patient_key")
                .unwrap()
                .as_primitive::<Int64Type>()
                .values()
                .to_vec()
        })
        .collect()
}

fn text(b: &arrow::array::RecordBatch, col: usize, row: usize) -> String {
    let f = arrow::util::display::ArrayFormatter::try_new(
        b.column(col).as_ref(),
        &arrow::util::display::FormatOptions::default(),
    )
    .unwrap();
    f.value(row).to_string()
}

/// Differential privacy: every cell of the keys' public domains is
/// released, each count within a few σ of the truth (σ as the answer
/// states it), every answer drawn afresh, and the charge recorded.
#[test]
fn dp_releases_every_domain_cell_near_the_truth_with_its_noise() {
    let policy = test_policy();
    let store = &fixture().store;
    let project = &policy.projects["demo-research"];
    let sql = "SELECT sex, age_band, count(DISTINCT patient_id) AS n, count(*) AS rows \
               FROM patients GROUP BY sex, age_band";
    let a = ask("demo-research", sql).unwrap();
    let b = ask("demo-research", sql).unwrap();
    let privacy = a.privacy.as_ref().expect("a dp answer states its noise");
    let rb = &a.result.batch;
    assert_eq!(rb.num_rows(), 2 * 8, "every sex × age band, zeros included");
    assert_ne!(rb, &b.result.batch, "fresh noise for every answer");
    let truth = direct(store, &policy, project, sql);
    let key =
        |b: &arrow::array::RecordBatch, i: usize| format!("{}|{}", text(b, 0, i), text(b, 1, i));
    let truth_at: HashMap<String, usize> =
        (0..truth.num_rows()).map(|i| (key(&truth, i), i)).collect();
    for (c, noise) in [2, 3].into_iter().zip(&privacy.columns[2..]) {
        let sigma = noise.unwrap().sigma;
        // One patient per cell (keys of the patient), 1 row or up to
        // max_rows of them: σ = √1 · bound / √(2ρ).
        let bound = if c == 2 { 1.0 } else { 5.0 };
        assert!(
            (sigma - bound / (2.0f64 * 0.02).sqrt()).abs() < 1e-6,
            "σ {sigma}"
        );
        for i in 0..rb.num_rows() {
            let want = truth_at
                .get(&key(rb, i))
                .map_or(0, |&t| truth.column(c).as_primitive::<Int64Type>().value(t));
            let col = rb.column(c).as_primitive::<Int64Type>();
            if col.is_valid(i) {
                // 5σ: a false alarm about once in 3.5 million cells.
                let got = col.value(i);
                assert!(
                    ((got - want) as f64).abs() <= 5.0 * sigma,
                    "{}: {got} vs {want}",
                    key(rb, i)
                );
                assert!(got > 7, "the threshold applies to the noisy count");
            } else {
                assert!(
                    (want as f64) < 7.0 + 5.0 * sigma,
                    "{}: {want} redacted",
                    key(rb, i)
                );
            }
        }
    }
    let json = gpdp::tre::to_json(&a);
    assert_eq!(json["privacy"]["rho_charged"].as_f64(), Some(0.04));
    assert!(
        json["privacy"]["noise"][0]["ci95_half_width"]
            .as_f64()
            .unwrap()
            > 9.0
    );
    assert!(gpdp::tre::to_table(&a).contains("(95%"));
    // A WHERE that names a key's values narrows its cells to them (the
    // query's text decides, not the data); under OR it does not.
    for (sql, rows) in [
        (
            "SELECT sex, count(DISTINCT patient_id) FROM patients WHERE sex = 'M' GROUP BY sex",
            1,
        ),
        (
            "SELECT imd_decile, count(*) FROM patients WHERE imd_decile IN (1, 2) AND sex = 'F' GROUP BY imd_decile",
            2,
        ),
        (
            "SELECT sex, count(*) FROM patients WHERE sex = 'M' OR age_band = '80+' GROUP BY sex",
            2,
        ),
    ] {
        assert_eq!(
            ask("demo-research", sql).unwrap().result.batch.num_rows(),
            rows,
            "{sql}"
        );
    }
    // A year with no events at all is still a row.
    let years = ask(
        "demo-research",
        "SELECT event_year, count(DISTINCT patient_id) AS n FROM clinical_events GROUP BY event_year",
    )
    .unwrap();
    assert_eq!(years.result.batch.num_rows(), 2026 - 2000 + 1);
    let log = std::fs::read_to_string(store.join("audit/log.jsonl")).unwrap();
    assert!(log.contains("\"event\":\"privacy_charge\""));
    assert!(log.contains("\"rho_charged\":0.04"));
}

/// The budget is per researcher per store, across projects; a query that
/// would overspend is refused before it runs and costs nothing, as do
/// queries refused for any other reason.
#[test]
fn dp_budget_runs_out_and_refusals_cost_nothing() {
    let c = collected_with_ndoo(1, 300, 5, 4);
    let mut policy = TrePolicy::load(None).unwrap();
    policy.researchers[0].rho_budget = 0.05;
    let asking = |sql: &str| {
        query_blocking(
            &policy,
            &Request {
                store: c.store.clone(),
                user: "alice".into(),
                token: Some("demo-alice-token".into()),
                project: "demo-research".into(),
                sql: sql.into(),
            },
        )
    };
    let refused = |r: Result<gpdp::tre::Released, TreError>| match r {
        Err(TreError::Refused(r)) => r.rule,
        other => panic!("{other:?}"),
    };
    let one = "SELECT sex, count(DISTINCT patient_id) FROM patients GROUP BY sex";
    assert_eq!(refused(asking("SELECT * FROM patients")), "outside_grammar");
    assert_eq!(
        refused(asking("SELECT stddev(numeric_value) FROM clinical_events")),
        "statistic_not_available"
    );
    let first = asking(one).unwrap();
    assert_eq!(first.privacy.unwrap().ledger.spent, 0.02);
    // Two statistics (0.04) would pass 0.05: refused, nothing charged.
    assert_eq!(
        refused(asking(
            "SELECT sex, count(*), count(DISTINCT patient_id) FROM patients GROUP BY sex"
        )),
        "budget_exhausted"
    );
    let second = asking(one).unwrap();
    assert!((second.privacy.unwrap().ledger.spent - 0.04).abs() < 1e-12);
    assert_eq!(refused(asking(one)), "budget_exhausted");
    let log = std::fs::read_to_string(c.store.join("audit/log.jsonl")).unwrap();
    assert_eq!(log.matches("\"event\":\"privacy_charge\"").count(), 2);
    // Other projects' rule sets do not touch the budget.
    let mut other = Request {
        store: c.store.clone(),
        user: "alice".into(),
        token: Some("demo-alice-token".into()),
        project: "demo-opensafely".into(),
        sql: one.into(),
    };
    query_blocking(&policy, &other).unwrap();
    other.project = "demo-research".into();
    assert_eq!(refused(query_blocking(&policy, &other)), "budget_exhausted");
    // The refusal says what is left, and nothing else.
    let message = query_blocking(&policy, &other).unwrap_err().to_string();
    assert!(message.contains("0.0100 left"), "{message}");
}

/// Differential privacy bounds each patient's contribution: a patient
/// registered twice (ended and current) counts in one `registered` cell,
/// and in at most `max_groups` (here 3) event years — checked against the
/// truth with and without the bound, which differ by far more than the
/// noise.
#[test]
fn dp_bounds_each_patients_cells() {
    let toml =
        gpdp::policy::tre::DEFAULT_TRE_POLICY.replacen("max_groups = 8", "max_groups = 3", 1);
    let mut policy = TrePolicy::parse(&toml, Path::new("t.toml")).unwrap();
    for r in &mut policy.researchers {
        r.rho_budget = 1e9;
    }
    let store = &fixture().store;
    let project = &policy.projects["demo-research"];
    // The released counts of the cells whose first key is at least `from`
    // (the others are empty), and the σ of their sum.
    let total = |sql: &str, from: i64| -> (f64, f64) {
        let r = query_blocking(
            &policy,
            &Request {
                store: store.clone(),
                user: "alice".into(),
                token: Some("demo-alice-token".into()),
                project: "demo-research".into(),
                sql: sql.into(),
            },
        )
        .unwrap();
        let b = &r.result.batch;
        let n = b.column(1).as_primitive::<Int64Type>();
        let sigma = r.privacy.unwrap().columns[1].unwrap().sigma;
        let (mut sum, mut cells) = (0, 0);
        for i in 0..b.num_rows() {
            if text(b, 0, i).parse::<i64>().map_or(true, |k| k >= from) {
                assert!(n.is_valid(i), "{sql}: a large cell was redacted");
                sum += n.value(i);
                cells += 1;
            }
        }
        (sum as f64, sigma * f64::from(cells).sqrt())
    };
    let one = |sql: &str| -> f64 {
        direct(store, &policy, project, sql)
            .column(0)
            .as_primitive::<Int64Type>()
            .value(0) as f64
    };
    let patients = one("SELECT count(DISTINCT patient_id) FROM patients");
    let twice = one(
        "SELECT count(*) FROM (SELECT patient_id FROM patients GROUP BY patient_id \
         HAVING count(DISTINCT registered) > 1)",
    );
    let (got, sigma) = total(
        "SELECT registered, count(DISTINCT patient_id) AS n FROM patients GROUP BY registered",
        0,
    );
    assert!(twice > 10.0 * sigma, "the test needs movers: {twice}");
    assert!(
        (got - patients).abs() <= 5.0 * sigma,
        "{got} vs {patients} (unbounded {})",
        patients + twice
    );

    let unbounded = one(
        "SELECT sum(n) FROM (SELECT event_year, count(DISTINCT patient_id) AS n \
         FROM clinical_events WHERE event_year >= 2018 GROUP BY event_year)",
    );
    let bounded = one(
        "SELECT sum(CASE WHEN y > 3 THEN 3 ELSE y END) FROM (SELECT patient_id, \
         count(DISTINCT event_year) AS y FROM clinical_events WHERE event_year >= 2018 \
         GROUP BY patient_id)",
    );
    let (got, sigma) = total(
        "SELECT event_year, count(DISTINCT patient_id) AS n FROM clinical_events \
         WHERE event_year >= 2018 GROUP BY event_year",
        2018,
    );
    assert!(
        unbounded - bounded > 10.0 * sigma,
        "the test needs patients in > 3 years"
    );
    assert!(
        (got - bounded).abs() <= 5.0 * sigma,
        "{got} vs {bounded} (unbounded {unbounded})"
    );
}
