//! The TRE boundary: every case of `tests/it/tre_cases.slt`, the opt-out
//! filters against the generator's truth, authentication, the audit
//! trail of every request, and the released values against the published
//! rules — stated here as constants and applied by the tests' own
//! arithmetic to the store's truth, so that a threshold lowered or a
//! rounding dropped in the shipped policy fails here.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use crate::common::*;
use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use gpdp::policy::tre::TrePolicy;
use gpdp::tre::control::ColumnKind;
use gpdp::tre::{Boundary, Request, TreError, query_blocking};

/// One extract collected once, with the NDOO list ingested.
fn fixture() -> &'static Collected {
    static F: OnceLock<Collected> = OnceLock::new();
    F.get_or_init(|| collected_with_ndoo(3, 2000, 21, 9))
}

/// The shipped policy, with a privacy budget no test here runs out of.
fn test_policy() -> TrePolicy {
    let mut policy = TrePolicy::load(None).unwrap();
    for r in &mut policy.researchers {
        r.rho_budget = 1e9;
    }
    unlimited_cells(&mut policy);
    policy
}

/// [`test_policy`], with a perturbation key for the cell key method beside
/// it.
fn test_boundary() -> Boundary {
    Boundary {
        record_keys: Some(gpdp::tre::aggregates::record_keys::RecordKeys::from_bytes(
            &[3; 32],
        )),
        ..Boundary::new(test_policy())
    }
}

/// The cell key method's budget of released cells lifted: the tests here
/// ask it hundreds of cells (tests/it/ledger.rs tests the budget).
fn unlimited_cells(policy: &mut TrePolicy) {
    for p in policy.projects.values_mut() {
        p.disclosure.cell_budget = None;
    }
}

// ---------------------------------------------------------------------------
// The published rules: the oracle released values are checked against.
// Stated here from their sources, never read back from the policy or from
// a release.

/// OpenSAFELY's output checking rules: any statistic describing 7 or fewer
/// patients is redacted; counts are then rounded to the nearest 5.
const OPENSAFELY_REDACT_AT_OR_BELOW: i64 = 7;
const OPENSAFELY_ROUND_TO: i64 = 5;
/// ACRO/SACRO's defaults (after the statistical disclosure control
/// handbook's rules of thumb): a cell needs at least 10 contributors, so 9
/// or fewer are redacted; counts are rounded to 5; for sums, means and
/// counts of records, the 2 largest contributions may not make up more than
/// 90% of the total (N-K dominance), and what the 2 largest leave must be at
/// least 10% of the largest (the p% rule). A contributor is a patient.
const ACRO_THRESHOLD: i64 = 10;
const ACRO_ROUND_TO: i64 = 5;
const ACRO_DOMINANCE_N: usize = 2;
const ACRO_DOMINANCE_K: f64 = 0.9;
const ACRO_P_PERCENT: f64 = 0.1;

/// `x` rounded to the nearest multiple of `base`, halves up: the tests' own
/// arithmetic (with a base of 5 an integer count is never halfway).
fn nearest_multiple(x: i64, base: i64) -> i64 {
    let below = x - x.rem_euclid(base);
    if 2 * (x - below) >= base {
        below + base
    } else {
        below
    }
}

/// The two deterministic rule sets, as published.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Published {
    OpenSafely,
    Acro,
}

impl Published {
    fn project(self) -> &'static str {
        match self {
            Published::OpenSafely => "demo-opensafely",
            Published::Acro => "demo-prescribing-acro",
        }
    }

    /// Whether a statistic of `patients` contributors passes the threshold.
    fn enough(self, patients: usize) -> bool {
        match self {
            Published::OpenSafely => patients as i64 > OPENSAFELY_REDACT_AT_OR_BELOW,
            Published::Acro => patients as i64 >= ACRO_THRESHOLD,
        }
    }

    fn round_to(self) -> i64 {
        match self {
            Published::OpenSafely => OPENSAFELY_ROUND_TO,
            Published::Acro => ACRO_ROUND_TO,
        }
    }

    /// What the rules release for a count, from each contributing patient's
    /// part of it (1 each for a count of patients, their rows for a count
    /// of rows): `None` where it is redacted.
    fn count(self, parts: &[i64]) -> Option<i64> {
        let contributions: Vec<f64> = parts.iter().map(|&p| p as f64).collect();
        if !self.enough(parts.len())
            || (self == Published::Acro && acro_breaks(&contributions).is_some())
        {
            return None;
        }
        Some(nearest_multiple(parts.iter().sum(), self.round_to()))
    }
}

/// The ACRO contribution rule a cell's per-patient contributions break, if
/// any (computed here, independently of `gpdp::tre::control::dominance`).
fn acro_breaks(contributions: &[f64]) -> Option<&'static str> {
    let mut c = contributions.to_vec();
    c.sort_by(|a, b| b.total_cmp(a));
    let total: f64 = c.iter().sum();
    let largest: f64 = c.iter().take(ACRO_DOMINANCE_N).sum();
    if largest > ACRO_DOMINANCE_K * total {
        return Some("N-K");
    }
    let rest = total - c.iter().take(2).sum::<f64>();
    if rest < ACRO_P_PERCENT * c.first().copied().unwrap_or(0.0) {
        return Some("p%");
    }
    None
}

/// The oracle itself, on figures worked by hand.
#[test]
fn the_tests_own_rules_give_the_published_answers() {
    for (x, want) in [
        (0, 0),
        (2, 0),
        (3, 5),
        (6, 5),
        (7, 5),
        (8, 10),
        (13, 15),
        (49, 50),
    ] {
        assert_eq!(nearest_multiple(x, 5), want, "{x}");
    }
    assert_eq!(Published::OpenSafely.count(&[1; 7]), None);
    assert_eq!(Published::OpenSafely.count(&[1; 8]), Some(10));
    assert_eq!(
        Published::OpenSafely.count(&[3; 6]),
        None,
        "18 rows of 6 patients"
    );
    assert_eq!(Published::Acro.count(&[1; 9]), None);
    assert_eq!(Published::Acro.count(&[1; 10]), Some(10));
    // 95 of 98 in two patients' rows; 85 of 100 is not dominated.
    assert_eq!(acro_breaks(&[50.0, 45.0, 1.0, 1.0, 1.0]), Some("N-K"));
    assert_eq!(acro_breaks(&[45.0, 40.0, 10.0, 5.0]), None);
}

/// `sql` asked in `project` as its demo researcher.
fn ask(project: &str, sql: &str) -> Result<gpdp::tre::Released, TreError> {
    let tre = test_boundary();
    let (user, token) = researcher_of(project);
    query_blocking(
        &tre,
        &Request {
            store: fixture().store.clone(),
            user: user.into(),
            token: Some(token.into()),
            project: project.into(),
            sql: sql.into(),
        },
    )
}

/// Every case of `tests/it/tre_cases.slt` gets its expected outcome:
/// released, refused by the rule it names, or an error; under OpenSAFELY and
/// ACRO every released count is a multiple of the published rounding. Cases
/// whose rule reads `N patients` sit at a threshold: the query's first
/// statistic must count exactly N patients in the fixture (checked here
/// against the project's views directly), the case must say what the
/// published rule does with N (`withheld` at or below the threshold,
/// `released` above), and each count released must be its truth rounded by
/// the test's own arithmetic. A released or withheld case's answer must be
/// the one written below its `----` (for dp, whose values are noise, the
/// column names alone). An unknown project or an unreadable block is an
/// error of the table, named by its line.
///
/// `GPDP_COMPLETE=1` writes the answers observed below `----` instead of
/// comparing them (never an outcome or a rule: a case whose outcome differs
/// still fails); `GPDP_CASE` runs only the cases whose block holds that line
/// number or whose SQL holds that text.
#[test]
fn every_boundary_case_has_its_expected_outcome() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/tre_cases.slt");
    let text = std::fs::read_to_string(&path).unwrap();
    let complete = std::env::var("GPDP_COMPLETE").is_ok_and(|v| v == "1");
    let only = std::env::var("GPDP_CASE")
        .ok()
        .filter(|s| !s.trim().is_empty());
    let mut failures = Vec::new();
    let mut completed = Vec::new();
    let (mut cases, mut at_thresholds, mut with_values) = (0, 0, 0);
    for case in parse_cases(&text) {
        let at = format!("tre_cases.slt:{}", case.line);
        // Checked for every block, whichever cases `GPDP_CASE` picks.
        let (project, published) = match case.project.as_str() {
            "research" => ("demo-opensafely", Some(Published::OpenSafely)),
            "acro" => ("demo-prescribing-acro", Some(Published::Acro)),
            "exempt" => ("demo-planning-exempt", None),
            "dp" => ("demo-research", None),
            other => panic!("{at}: unknown project {other:?} (research, acro, exempt or dp)"),
        };
        if let Some(only) = &only
            && !case.is_picked_by(only.trim())
        {
            continue;
        }
        let (expected, rule, sql) = (case.expected.as_str(), case.rule.as_str(), &case.sql);
        cases += 1;
        let answer = ask(project, sql);
        // The answer as the case file writes it: values, unless they are noise.
        let values = case.project != "dp";
        let observed = answer.as_ref().ok().map(|r| answer_lines(r, sql, values));
        let outcome_as_expected = if let Some(patients) = rule.strip_suffix(" patients") {
            let patients: usize = patients
                .parse()
                .unwrap_or_else(|_| panic!("{at}: {rule:?} is not `N patients`"));
            let published = published
                .unwrap_or_else(|| panic!("{at}: thresholds are checked under research and acro"));
            at_thresholds += 1;
            match at_a_threshold(published, expected, patients, sql, &at, answer) {
                Ok(()) => true,
                Err(e) => {
                    failures.push(format!("{at}: {sql}\n    {e}"));
                    false
                }
            }
        } else {
            let got = match answer {
                Ok(r) => {
                    // Every released count is a multiple of the published rounding.
                    for (i, kind) in r.kinds().iter().enumerate() {
                        if let (ColumnKind::Count, Some(rules)) = (kind, published) {
                            let c = r.result.batch.column(i).as_primitive::<Int64Type>();
                            for v in c.iter().flatten() {
                                if v % rules.round_to() != 0 {
                                    failures.push(format!(
                                        "{at}: {sql}\n    released count {v} is not a multiple of {}",
                                        rules.round_to()
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
            let as_expected = (got.0.as_str(), got.1.as_str()) == (expected, rule);
            if !as_expected {
                failures.push(format!(
                    "{at}: {sql}\n    expected {expected} {rule}, got {} {}",
                    got.0, got.1
                ));
            }
            as_expected
        };
        // The answer below `----`: only a released or withheld case has one.
        match (expected, observed) {
            ("released" | "withheld", Some(observed)) if outcome_as_expected => {
                with_values += usize::from(values);
                if case.answer.as_ref() != Some(&observed) {
                    match &case.answer {
                        _ if complete => completed.push((case.answer_at.clone(), observed)),
                        Some(want) => failures.push(format!(
                            "{at}: {sql}\n    expected answer:\n      {}\n    got:\n      {}",
                            want.join("\n      "),
                            observed.join("\n      ")
                        )),
                        None => failures.push(format!(
                            "{at}: {sql}\n    no answer below `----` (GPDP_COMPLETE=1 writes the one observed)"
                        )),
                    }
                }
            }
            ("released" | "withheld", _) => {}
            _ if case.answer.is_some() => failures.push(format!(
                "{at}: a case expected {expected} has no answer below `----`"
            )),
            _ => {}
        }
    }
    if !completed.is_empty() {
        std::fs::write(&path, with_answers(&text, &completed)).unwrap();
        eprintln!(
            "GPDP_COMPLETE: wrote {} answer(s) into {} (review them in `git diff`)",
            completed.len(),
            path.display()
        );
    }
    match &only {
        Some(only) => assert!(cases > 0, "GPDP_CASE={only:?} picks no case"),
        None => {
            assert!(cases >= 150, "at least 150 boundary cases ({cases})");
            assert!(
                at_thresholds >= 8,
                "at least 8 cases at the thresholds ({at_thresholds})"
            );
            assert!(
                with_values >= 50,
                "at least 50 cases with their released values ({with_values})"
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures in {cases} cases:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// One block of `tests/it/tre_cases.slt`.
struct Case {
    /// The block's first line (from 1), which failures name.
    line: usize,
    /// Its last line.
    last: usize,
    project: String,
    expected: String,
    /// `-` where the header names no rule.
    rule: String,
    sql: String,
    /// The lines below `----`, if the block has them.
    answer: Option<Vec<String>>,
    /// The lines (from 0) that `----` and the answer take, or the empty
    /// range where they would go: what `GPDP_COMPLETE=1` replaces.
    answer_at: std::ops::Range<usize>,
}

impl Case {
    /// Whether `GPDP_CASE=only` names this case: a line of its block, or
    /// text of its SQL.
    fn is_picked_by(&self, only: &str) -> bool {
        match only.parse::<usize>() {
            Ok(n) => (self.line..=self.last).contains(&n),
            Err(_) => self.sql.contains(only),
        }
    }
}

/// The case file's blocks: a header `<project> <outcome> [<rule>]`, the SQL
/// on the lines after it, then `----` and the answer; blank lines end a
/// block, and `#` lines are comments.
fn parse_cases(text: &str) -> Vec<Case> {
    let lines: Vec<&str> = text.lines().collect();
    let ends_block = |l: &str| l.trim().is_empty();
    let mut cases = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if ends_block(lines[i]) || lines[i].starts_with('#') {
            i += 1;
            continue;
        }
        let line = i + 1;
        let mut words = lines[i].split_whitespace();
        let (Some(project), Some(expected)) = (words.next(), words.next()) else {
            panic!(
                "tre_cases.slt:{line}: a block starts `<project> <outcome> [<rule>]`, not {:?}",
                lines[i]
            )
        };
        // `outside_grammar/<construct>` names the rule and the construct.
        let rule = words.collect::<Vec<_>>().join(" ");
        i += 1;
        let mut sql = Vec::new();
        while i < lines.len() && !ends_block(lines[i]) && lines[i].trim() != "----" {
            if !lines[i].starts_with('#') {
                sql.push(lines[i].trim());
            }
            i += 1;
        }
        assert!(!sql.is_empty(), "tre_cases.slt:{line}: a case without SQL");
        let start = i;
        let answer = (i < lines.len() && lines[i].trim() == "----").then(|| {
            i += 1;
            let mut answer = Vec::new();
            while i < lines.len() && !ends_block(lines[i]) {
                if !lines[i].starts_with('#') {
                    answer.push(lines[i].to_owned());
                }
                i += 1;
            }
            answer
        });
        cases.push(Case {
            line,
            last: i,
            project: project.to_owned(),
            expected: expected.to_owned(),
            rule: if rule.is_empty() {
                "-".to_owned()
            } else {
                rule
            },
            sql: sql.join("\n"),
            answer,
            answer_at: start..i,
        });
    }
    cases
}

/// A released answer as the case file writes it: its column names, then
/// (with `values`) its rows, each as `gpdp query` writes CSV; rows sorted
/// unless the SQL orders them.
fn answer_lines(r: &gpdp::tre::Released, sql: &str, values: bool) -> Vec<String> {
    let csv = gpdp::tre::output::to_csv(&r.result);
    let mut lines = csv.lines().map(str::to_owned);
    let columns = lines.next().unwrap_or_default();
    let mut rows: Vec<String> = if values { lines.collect() } else { Vec::new() };
    let sql = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if !sql.to_ascii_uppercase().contains("ORDER BY") {
        rows.sort();
    }
    std::iter::once(columns).chain(rows).collect()
}

/// `text` with `----` and each answer in place of the lines it replaces.
fn with_answers(text: &str, answers: &[(std::ops::Range<usize>, Vec<String>)]) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut answers: Vec<_> = answers.iter().collect();
    answers.sort_by_key(|(at, _)| at.start);
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    for (at, answer) in answers {
        out.extend(lines[i..at.start].iter().map(|l| l.to_string()));
        out.push("----".to_owned());
        out.extend(answer.iter().cloned());
        i = at.end;
    }
    out.extend(lines[i..].iter().map(|l| l.to_string()));
    out.join("\n") + "\n"
}

/// One case of the table at a threshold: `expected` (withheld or released)
/// for a query whose first statistic counts `patients` patients.
fn at_a_threshold(
    rules: Published,
    expected: &str,
    patients: usize,
    sql: &str,
    at: &str,
    answer: Result<gpdp::tre::Released, TreError>,
) -> Result<(), String> {
    let policy = test_policy();
    let truth = direct(
        &fixture().store,
        &policy,
        &policy.projects[rules.project()],
        sql,
    );
    assert_eq!(
        truth.num_rows(),
        1,
        "{at}: a case at a threshold asks for one cell"
    );
    let true_patients = truth.column(0).as_primitive::<Int64Type>().value(0);
    assert_eq!(
        true_patients, patients as i64,
        "{at}: the fixture has {true_patients} patients in this cell, not {patients}: choose another cell"
    );
    let released = rules.enough(patients);
    match (expected, released) {
        ("withheld", false) | ("released", true) => {}
        _ => panic!("{at}: {rules:?} does not leave {patients} patients {expected}"),
    }
    let r = answer.map_err(|e| format!("expected {expected}, got {e}"))?;
    let b = &r.result.batch;
    if !released {
        return match b.num_rows() {
            0 => Ok(()),
            _ => Err(format!(
                "{patients} patients, which {rules:?} redacts: released {}",
                gpdp::tre::output::to_csv(&r.result).trim()
            )),
        };
    }
    if b.num_rows() != 1 {
        return Err(format!(
            "{patients} patients: {} rows released",
            b.num_rows()
        ));
    }
    for (c, kind) in r.kinds().iter().enumerate() {
        if *kind != ColumnKind::Count {
            continue;
        }
        let want = nearest_multiple(
            truth.column(c).as_primitive::<Int64Type>().value(0),
            rules.round_to(),
        );
        let got = b.column(c).as_primitive::<Int64Type>();
        if got.is_null(0) || got.value(0) != want {
            return Err(format!(
                "{patients} patients: column {c} released {}, the published rule gives {want}",
                gpdp::tre::output::to_csv(&r.result).trim()
            ));
        }
    }
    Ok(())
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
    let round = |n: usize| nearest_multiple(n as i64, OPENSAFELY_ROUND_TO);
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
/// on its own, and rows with nothing releasable are withheld without a
/// trace. Every cell is compared with its true number of patients (counted
/// directly over the views): a row is there exactly when more than 7
/// patients are in it, with its count of registrations rounded to 5; and a
/// statistic under its own FILTER is redacted or released by the patients
/// of that FILTER, beside one released in the same row.
#[test]
fn small_statistics_are_redacted_and_empty_rows_withheld() {
    let policy = test_policy();
    let project = &policy.projects["demo-opensafely"];
    let store = &fixture().store;
    let keys = "age_band, sex, ethnicity, imd_decile";
    let r = ask(
        "demo-opensafely",
        &format!("SELECT {keys}, count(*) AS n FROM patients GROUP BY {keys}"),
    )
    .unwrap();
    let c = &r.result;
    let truth = direct(
        store,
        &policy,
        project,
        &format!(
            "SELECT {keys}, count(DISTINCT patient_id) AS patients, count(*) AS n FROM patients \
             GROUP BY {keys}"
        ),
    );
    let key = |b: &arrow::array::RecordBatch, width: usize, i: usize| {
        (0..width)
            .map(|c| text(b, c, i))
            .collect::<Vec<_>>()
            .join("|")
    };
    let at: HashMap<String, usize> = (0..c.batch.num_rows())
        .map(|i| (key(&c.batch, 4, i), i))
        .collect();
    let (mut withheld, mut shown) = (0, 0);
    for t in 0..truth.num_rows() {
        let k = key(&truth, 4, t);
        let patients = truth.column(4).as_primitive::<Int64Type>().value(t);
        let n = truth.column(5).as_primitive::<Int64Type>().value(t);
        match at.get(&k) {
            None => {
                assert!(
                    patients <= OPENSAFELY_REDACT_AT_OR_BELOW,
                    "{k}: {patients} patients withheld"
                );
                withheld += 1;
            }
            Some(&i) => {
                assert!(
                    patients > OPENSAFELY_REDACT_AT_OR_BELOW,
                    "{k}: {patients} patients released"
                );
                assert_eq!(
                    c.batch.column(4).as_primitive::<Int64Type>().value(i),
                    nearest_multiple(n, OPENSAFELY_ROUND_TO),
                    "{k}: {n} registrations of {patients} patients"
                );
                shown += 1;
            }
        }
    }
    assert_eq!(shown, c.batch.num_rows(), "no row without its truth");
    assert!(withheld > 0, "rare combinations exist in the test data");
    assert!(shown > 0);
    assert_eq!(c.operator.withheld_rows, withheld, "the audit log's count");
    assert_eq!(c.redacted_cells, 0, "the only statistic of a withheld row");
    assert_eq!(c.batch.column(4).null_count(), 0);
    let csv = gpdp::tre::output::to_csv(c);
    assert!(!csv.contains("[REDACTED]"));
    // Two statistics with different contributors: the second is redacted
    // on its own where few patients contribute to it.
    let r = ask(
        "demo-opensafely",
        "SELECT age_band, count(*) AS n, count(*) FILTER (WHERE ethnicity = 'Other') AS other FROM patients GROUP BY age_band",
    )
    .unwrap();
    let c = &r.result;
    let truth = direct(
        store,
        &policy,
        project,
        "SELECT age_band, count(DISTINCT patient_id), count(*), \
         count(DISTINCT CASE WHEN ethnicity = 'Other' THEN patient_id END), \
         sum(CASE WHEN ethnicity = 'Other' THEN 1 ELSE 0 END) FROM patients GROUP BY age_band",
    );
    let at: HashMap<String, usize> = (0..c.batch.num_rows())
        .map(|i| (key(&c.batch, 1, i), i))
        .collect();
    let (mut redacted, mut released) = (0, 0);
    for t in 0..truth.num_rows() {
        let k = key(&truth, 1, t);
        let value = |col: usize| truth.column(col).as_primitive::<Int64Type>().value(t);
        let row = at[&k];
        for (c_out, patients, rows) in [(1, value(1), value(2)), (2, value(3), value(4))] {
            let column = c.batch.column(c_out).as_primitive::<Int64Type>();
            let got = column.is_valid(row).then(|| column.value(row));
            let want = (patients > OPENSAFELY_REDACT_AT_OR_BELOW)
                .then(|| nearest_multiple(rows, OPENSAFELY_ROUND_TO));
            assert_eq!(
                got, want,
                "{k} column {c_out}: {rows} rows of {patients} patients"
            );
            if c_out == 2 {
                redacted += usize::from(got.is_none());
                released += usize::from(got.is_some());
            }
        }
    }
    assert!(
        redacted > 0 && released > 0,
        "{}",
        gpdp::tre::output::to_csv(c)
    );
    assert_eq!(c.redacted_cells, redacted);
    assert!(gpdp::tre::output::to_csv(c).contains("[REDACTED]"));
    let json = gpdp::tre::output::to_json(&r).to_string();
    assert!(!json.contains("withheld"), "{json}");
}

/// The thresholds where they bite. Every cell of three tables (patients by
/// sex, age band and decile; diagnoses and prescriptions by code and year),
/// under OpenSAFELY and under ACRO, is checked against the published rules
/// applied here to the store's truth, counted patient by patient directly
/// over the project's views: a count of patients and a count of rows per
/// cell, each redacted or rounded by the tests' own arithmetic (ACRO's N-K
/// and p% rules over each patient's rows for counts of rows). Among the cells
/// are at least two of exactly 6, 7 and 8 patients under OpenSAFELY and of 8,
/// 9 and 10 under ACRO, so a threshold set one lower, or a rounding dropped,
/// releases a cell the rule redacts or a value it rounds; and the rows of a
/// cell (prescriptions: many per patient) never pass a threshold that its
/// patients do not.
#[test]
fn counts_at_the_thresholds_are_released_by_the_published_rules() {
    let policy = test_policy();
    let store = &fixture().store;
    let tables = [
        ("sex, age_band, imd_decile", "patients"),
        ("snomedct_code, event_year", "clinical_events"),
        ("dmd_code, event_year", "medications"),
    ];
    let mut failures = Vec::new();
    for (rules, edges) in [
        (Published::OpenSafely, [6, 7, 8]),
        (Published::Acro, [8, 9, 10]),
    ] {
        let project = rules.project();
        let mut at_edge: std::collections::BTreeMap<usize, usize> =
            edges.iter().map(|&e| (e, 0)).collect();
        for (keys, table) in tables {
            let width = keys.split(',').count();
            let key = |b: &arrow::array::RecordBatch, i: usize| {
                (0..width)
                    .map(|c| text(b, c, i))
                    .collect::<Vec<_>>()
                    .join("|")
            };
            // Each cell's patients, with their rows in it.
            let truth = direct(
                store,
                &policy,
                &policy.projects[project],
                &format!(
                    "SELECT {keys}, patient_key, count(*) AS rows FROM {table} \
                     GROUP BY {keys}, patient_key"
                ),
            );
            let mut cells: HashMap<String, Vec<i64>> = HashMap::new();
            for i in 0..truth.num_rows() {
                let rows = truth.column(width + 1).as_primitive::<Int64Type>();
                cells.entry(key(&truth, i)).or_default().push(rows.value(i));
            }
            let sql = format!(
                "SELECT {keys}, count(DISTINCT patient_id) AS patients, count(*) AS rows \
                 FROM {table} GROUP BY {keys}"
            );
            let released = ask(project, &sql).unwrap();
            let b = &released.result.batch;
            let at: HashMap<String, usize> = (0..b.num_rows()).map(|i| (key(b, i), i)).collect();
            for k in at.keys() {
                if !cells.contains_key(k) {
                    failures.push(format!("{project} {sql}: invented cell {k}"));
                }
            }
            for (k, rows) in &cells {
                if let Some(n) = at_edge.get_mut(&rows.len()) {
                    *n += 1;
                }
                let want = [rules.count(&vec![1; rows.len()]), rules.count(rows)];
                for (c, want) in want.into_iter().enumerate() {
                    let column = b.column(width + c).as_primitive::<Int64Type>();
                    let got = at
                        .get(k)
                        .filter(|&&i| column.is_valid(i))
                        .map(|&i| column.value(i));
                    if got != want {
                        failures.push(format!(
                            "{project} by {keys}: cell {k} of {} patients ({} rows): {} released {got:?}, the published rule gives {want:?}",
                            rows.len(),
                            rows.iter().sum::<i64>(),
                            ["patients", "rows"][c]
                        ));
                    }
                }
            }
        }
        for (size, n) in at_edge {
            assert!(
                n >= 2,
                "{project}: {n} cells of exactly {size} patients; the tables no longer probe the threshold"
            );
        }
    }
    failures.sort();
    assert!(
        failures.is_empty(),
        "{} statistics differ from the published rules; the first:\n  {}",
        failures.len(),
        failures[..failures.len().min(12)].join("\n  ")
    );
}

/// Through the binary, refusals exit 3 and name their rule, and every
/// request is audited: each has its own line in the audit log — found by its
/// own SQL text (a comment makes each one unique) in a store no other test
/// writes — with its user, project, outcome and rule, and nothing else is
/// logged. An unaudited refusal would leave its request without a line.
#[test]
fn the_command_line_refuses_with_exit_3_and_logs_everything() {
    let own = collected_with_ndoo(1, 300, 17, 6);
    let store = own.store.to_str().unwrap();
    let log = || std::fs::read_to_string(own.store.join("audit/log.jsonl")).unwrap();
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
    let before = log().lines().count();
    // (user, token, project, sql, exit status, outcome, rule, construct)
    let requests = [
        (
            "alice",
            Some("demo-alice-token"),
            "demo-opensafely",
            "SELECT sex, count(*) AS n FROM patients GROUP BY sex",
            0,
            "released",
            None,
            None,
        ),
        (
            "alice",
            Some("wrong-token"),
            "demo-opensafely",
            "SELECT count(*) FROM patients",
            3,
            "refused",
            Some("authentication"),
            None,
        ),
        (
            "alice",
            None,
            "demo-opensafely",
            "SELECT count(*) FROM patients",
            3,
            "refused",
            Some("authentication"),
            None,
        ),
        (
            "bob",
            Some("demo-bob-token"),
            "demo-opensafely",
            "SELECT count(*) FROM patients",
            3,
            "refused",
            Some("safe_people"),
            None,
        ),
        (
            "alice",
            Some("demo-alice-token"),
            "no-such-project",
            "SELECT count(*) FROM patients",
            3,
            "refused",
            Some("safe_projects"),
            None,
        ),
        (
            "alice",
            Some("demo-alice-token"),
            "demo-opensafely",
            "SELECT * FROM patients",
            3,
            "refused",
            Some("outside_grammar"),
            Some("not_an_aggregate"),
        ),
    ];
    let mut asked = Vec::new();
    for (i, (user, token, project, sql, status, outcome, rule, construct)) in
        requests.into_iter().enumerate()
    {
        let sql = format!("{sql} /* request {i} */");
        let o = query(user, token, project, &sql);
        assert_eq!(
            o.status.code(),
            Some(status),
            "{user} {project} {sql}: {}",
            stderr(&o)
        );
        if let Some(rule) = rule {
            assert!(stderr(&o).contains(rule), "{}", stderr(&o));
            assert!(!stderr(&o).contains(store), "no paths in refusals");
        } else {
            assert!(stdout(&o).contains("disclosure control opensafely"));
        }
        asked.push((user, project, sql, outcome, rule, construct));
    }
    let log = log();
    let entries: Vec<serde_json::Value> = log
        .lines()
        .skip(before)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["entry"].clone())
        .collect();
    for (user, project, sql, outcome, rule, construct) in &asked {
        let own: Vec<&serde_json::Value> = entries
            .iter()
            .filter(|e| e["sql"].as_str() == Some(sql.as_str()))
            .collect();
        let [e] = own[..] else {
            panic!("{sql}: {} audit lines", own.len())
        };
        assert_eq!(e["event"], "query", "{e}");
        assert_eq!(e["user"], *user, "{e}");
        assert_eq!(e["project"], *project, "{e}");
        assert_eq!(e["outcome"], *outcome, "{e}");
        assert_eq!(e["rule"].as_str(), *rule, "{e}");
        assert_eq!(e["construct"].as_str(), *construct, "{e}");
        if *outcome == "released" {
            assert!(e["result_sha256"].is_string(), "{e}");
            assert_eq!(e["disclosure"], "opensafely", "{e}");
        }
    }
    assert_eq!(
        entries.len(),
        asked.len(),
        "one line per request, and no other"
    );
    assert!(
        !log.contains("demo-alice-token") && !log.contains("wrong-token"),
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

/// ACRO's dominance rules run over patients: every cell of two sums in the
/// ACRO project is checked against the store itself (each patient's total
/// in each cell computed here, independently) and the published rules
/// applied by the test — released, at its true total, where at least 10
/// patients contribute, no two of them make up more than 90% of it and the
/// rest is at least 10% of the largest; redacted otherwise. And the rules
/// did redact by dominance: two drugs prescribed in very different
/// quantities per item (56 and 1), by year and age band, give cells of 10
/// or more patients where two patients on the larger make up 90–96% of the
/// total; each is redacted, its truth dominated by the test's own N-K
/// computation, and the audit log counts it under dominance. (A k of 0.99,
/// or contributions counted per record, releases them.)
#[test]
fn acro_sums_pass_dominance_over_patients_checked_against_the_store() {
    let policy = test_policy();
    let project = &policy.projects["demo-prescribing-acro"];
    let store = &fixture().store;
    // Per code, per patient: their total quantity, read from the table
    // itself with the NDOO patients taken out here.
    let mut by_code: HashMap<String, HashMap<i64, f64>> = HashMap::new();
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
            *by_code
                .entry(code.value(i).to_owned())
                .or_default()
                .entry(keys.value(i))
                .or_default() += q.value(i);
        }
    }
    // Per year and age band, per patient, for the two drugs: over the
    // project's views directly (the same join the question makes).
    let two_drugs = "FROM medications m JOIN patients p ON m.patient_id = p.patient_id \
                     WHERE m.dmd_code IN ('325242002', '320139002')";
    let truth = direct(
        store,
        &policy,
        project,
        &format!(
            "SELECT m.event_year, p.age_band, m.patient_key, sum(m.quantity) {two_drugs} \
             AND m.quantity IS NOT NULL GROUP BY m.event_year, p.age_band, m.patient_key"
        ),
    );
    let mut by_year_and_band: HashMap<String, HashMap<i64, f64>> = HashMap::new();
    for i in 0..truth.num_rows() {
        by_year_and_band
            .entry(format!("{}|{}", text(&truth, 0, i), text(&truth, 1, i)))
            .or_default()
            .insert(
                truth.column(2).as_primitive::<Int64Type>().value(i),
                truth
                    .column(3)
                    .as_primitive::<arrow::datatypes::Float64Type>()
                    .value(i),
            );
    }
    let (mut released, mut dominated) = (0, 0);
    for (sql, width, cells) in [
        (
            "SELECT dmd_code, sum(quantity) AS total FROM medications GROUP BY dmd_code".to_owned(),
            1,
            by_code,
        ),
        (
            format!(
                "SELECT m.event_year, p.age_band, sum(m.quantity) AS total {two_drugs} \
                 GROUP BY m.event_year, p.age_band"
            ),
            2,
            by_year_and_band,
        ),
    ] {
        let r = ask("demo-prescribing-acro", &sql).unwrap();
        let b = &r.result.batch;
        let totals = b
            .column(width)
            .as_primitive::<arrow::datatypes::Float64Type>();
        let at: HashMap<String, usize> = (0..b.num_rows())
            .map(|i| {
                let k: Vec<String> = (0..width).map(|c| text(b, c, i)).collect();
                (k.join("|"), i)
            })
            .collect();
        let mut nk = 0;
        for (k, per) in &cells {
            let c: Vec<f64> = per.values().copied().collect();
            let total: f64 = c.iter().sum();
            let got = at
                .get(k)
                .filter(|&&i| totals.is_valid(i))
                .map(|&i| totals.value(i));
            let breaks = acro_breaks(&c);
            match (Published::Acro.enough(c.len()), breaks, got) {
                (true, None, Some(got)) => {
                    assert!(
                        (got - total).abs() <= 1e-9 * total.max(1.0),
                        "{sql}: {k}: released {got}, truth {total}"
                    );
                    released += 1;
                }
                (true, Some(rule), None) => {
                    nk += usize::from(rule == "N-K");
                }
                (false, _, None) => {}
                (enough, breaks, got) => panic!(
                    "{sql}: {k}: {} patients (enough: {enough}), breaks {breaks:?}: released {got:?}",
                    c.len()
                ),
            }
        }
        for k in at.keys() {
            assert!(cells.contains_key(k), "{sql}: invented cell {k}");
        }
        let reasons = &r.result.operator.redacted_by_reason;
        assert_eq!(
            reasons.get("dominance").copied().unwrap_or(0),
            nk,
            "{sql}: the audit log's cells redacted by dominance"
        );
        dominated += nk;
    }
    assert!(released > 10, "{released} sums released");
    assert!(
        dominated >= 3,
        "{dominated} cells redacted by dominance: the test needs dominated cells"
    );
}

/// Legitimate questions answer with the truth: every released count is the
/// true count (the same SQL run directly over the project's views) rounded
/// to the nearest 5 by the test's own arithmetic, every released mean is
/// the true sum over its count of values as released — rounded (the column
/// before it: a mean from the exact count would give that count away) —
/// nothing is invented, and patient counts above OpenSAFELY's published
/// threshold are never lost (the threshold and rounding are the test's
/// constants, not read back from the release). (A compiler that turned
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
                        let small = want <= OPENSAFELY_REDACT_AT_OR_BELOW;
                        match cell {
                            Some(r) => {
                                shown += 1;
                                let got = b.column(c).as_primitive::<Int64Type>().value(r);
                                assert!(!small, "{sql}: {key} col {c}: {want} released");
                                assert_eq!(
                                    got,
                                    nearest_multiple(want, OPENSAFELY_ROUND_TO),
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
                            let released_n = nearest_multiple(n, OPENSAFELY_ROUND_TO);
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
    use gpdp::tre::aggregates::record_keys::RecordKeys;
    let sql = "SELECT age_band, sex, imd_decile, count(DISTINCT patient_id) AS n, count(*) AS rows \
               FROM patients GROUP BY age_band, sex, imd_decile";
    let store = &fixture().store;
    let request = |sql: &str| Request {
        store: store.clone(),
        user: "carol".into(),
        token: Some("demo-carol-token".into()),
        project: "demo-planning-exempt".into(),
        sql: sql.into(),
    };
    let without = Boundary::new(TrePolicy::load(None).unwrap());
    match query_blocking(&without, &request(sql)) {
        Err(TreError::Refused(r)) => assert_eq!(r.rule, "no_perturbation_key"),
        other => panic!("{other:?}"),
    }
    let with = |byte: u8| {
        let mut p = TrePolicy::load(None).unwrap();
        unlimited_cells(&mut p);
        Boundary {
            record_keys: Some(RecordKeys::from_bytes(&[byte; 32])),
            ..Boundary::new(p)
        }
    };
    // The fixture's other tests use key 3: the store is bound to it.
    let (one, other) = (with(3), with(8));
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
    // Another key on this store is refused: its fresh noise could be
    // averaged with this key's. On a copy not yet bound to any key it
    // answers — with other noise.
    match query_blocking(&other, &request(sql)) {
        Err(TreError::Refused(r)) => assert_eq!(r.rule, "perturbation_key_changed"),
        other => panic!("{other:?}"),
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("store");
    for (rel, bytes) in tree(store) {
        if rel.starts_with("audit") {
            continue;
        }
        let path = copy.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let b = query_blocking(
        &other,
        &Request {
            store: copy,
            ..request(sql)
        },
    )
    .unwrap();
    assert_eq!(a.result.batch, again.result.batch, "same key, same answer");
    assert_ne!(
        a.result.batch, b.result.batch,
        "the noise depends on the key"
    );
    // Against the same SQL run directly.
    let policy = &one.policy;
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
    // One draw decides for one set of records: a count of values, their
    // sum and their mean are released or redacted together (a mean shown
    // where the count is hidden would be a second threshold draw over the
    // same patients).
    let rb = &a.result.batch;
    for i in 0..rb.num_rows() {
        let shown: Vec<bool> = (2..5).map(|c| rb.column(c).is_valid(i)).collect();
        assert!(
            shown.iter().all(|&v| v == shown[0]),
            "row {i}: count, sum and mean released {shown:?}"
        );
    }
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

/// The same question gets the same answer however the engine splits the
/// work: with 1 to 8 partitions, rows of one patient (a mover's two
/// practices, a file's row groups) are added up in other orders and
/// merged from other partial states. Under the cell key method the noise
/// must not move with them — were a patient's contribution keyed by the
/// bits of their floating-point total, `(a + b) + c` against `a + (b + c)`
/// would draw fresh noise for the same records, and a researcher who
/// asked again could average it away (seen at the demo's size, where
/// DataFusion's repartitioning interleaves rows differently from run to
/// run). Counts must agree exactly; sums and means to 1e-9 of their value
/// (what summing the same numbers in another order may change), far
/// below a fresh draw's ±25–75% of the cell's largest contribution.
#[test]
fn answers_do_not_depend_on_how_the_engine_splits_the_work() {
    let sqls = [
        "SELECT p.sex, count(*) AS n, count(c.numeric_value) AS values, \
         sum(c.numeric_value) AS total, avg(c.numeric_value) AS mean \
         FROM clinical_events c JOIN patients p ON c.patient_id = p.patient_id GROUP BY p.sex",
        "SELECT p.age_band, c.event_year, count(DISTINCT c.patient_id) AS patients, \
         sum(c.numeric_value) AS total, avg(c.numeric_value) AS mean \
         FROM clinical_events c JOIN patients p ON c.patient_id = p.patient_id \
         GROUP BY p.age_band, c.event_year",
    ];
    let store = &fixture().store;
    for project in [
        "demo-planning-exempt",
        "demo-opensafely",
        "demo-prescribing-acro",
    ] {
        let (user, token) = researcher_of(project);
        for sql in sqls {
            let answer = |partitions: usize| {
                let tre = Boundary {
                    partitions,
                    ..test_boundary()
                };
                let request = Request {
                    store: store.clone(),
                    user: user.into(),
                    token: Some(token.into()),
                    project: project.into(),
                    sql: sql.into(),
                };
                query_blocking(&tre, &request)
                    .unwrap_or_else(|e| panic!("{project}, {partitions} partitions: {e}"))
                    .result
                    .batch
            };
            let one = answer(1);
            assert!(one.num_rows() > 1, "{project}: {sql}: too little released");
            for partitions in [2, 3, 5, 8] {
                let other = answer(partitions);
                assert_eq!(one.schema(), other.schema());
                assert_eq!(
                    one.num_rows(),
                    other.num_rows(),
                    "{project}, {partitions} partitions"
                );
                for c in 0..one.num_columns() {
                    let (a, b) = (one.column(c), other.column(c));
                    let name = one.schema().field(c).name().clone();
                    if a.data_type() != &arrow::datatypes::DataType::Float64 {
                        assert_eq!(a, b, "{project}: {name} with {partitions} partitions");
                        continue;
                    }
                    let (a, b) = (
                        a.as_primitive::<arrow::datatypes::Float64Type>(),
                        b.as_primitive::<arrow::datatypes::Float64Type>(),
                    );
                    for i in 0..one.num_rows() {
                        assert_eq!(a.is_null(i), b.is_null(i), "{project}: {name} row {i}");
                        let (x, y) = (a.value(i), b.value(i));
                        assert!(
                            (x - y).abs() <= 1e-9 * x.abs().max(1.0),
                            "{project}: {name} row {i} is {x} with 1 partition, {y} with {partitions}"
                        );
                    }
                }
            }
        }
    }
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
    let json = gpdp::tre::output::to_json(&a);
    assert_eq!(json["privacy"]["rho_charged"].as_f64(), Some(0.04));
    assert!(
        json["privacy"]["noise"][0]["ci95_half_width"]
            .as_f64()
            .unwrap()
            > 9.0
    );
    assert!(gpdp::tre::output::to_table(&a).contains("(95%"));
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
    // dana, the `dp` researcher, with a small budget and also approved for
    // demo-opensafely (as a policy recording a mixed_rules_reason would).
    let dana = policy
        .researchers
        .iter_mut()
        .find(|r| r.user == "dana")
        .unwrap();
    dana.rho_budget = 0.05;
    dana.projects.push("demo-opensafely".into());
    let tre = Boundary::new(policy);
    let asking = |sql: &str| {
        query_blocking(
            &tre,
            &Request {
                store: c.store.clone(),
                user: "dana".into(),
                token: Some("demo-dana-token".into()),
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
        user: "dana".into(),
        token: Some("demo-dana-token".into()),
        project: "demo-opensafely".into(),
        sql: one.into(),
    };
    query_blocking(&tre, &other).unwrap();
    other.project = "demo-research".into();
    assert_eq!(refused(query_blocking(&tre, &other)), "budget_exhausted");
    // The refusal says what is left, and nothing else.
    let message = query_blocking(&tre, &other).unwrap_err().to_string();
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
    let tre = Boundary::new(policy);
    let policy = &tre.policy;
    let store = &fixture().store;
    let project = &policy.projects["demo-research"];
    // The released counts of the cells whose first key is at least `from`
    // (the others are empty), and the σ of their sum.
    let total = |sql: &str, from: i64| -> (f64, f64) {
        let r = query_blocking(
            &tre,
            &Request {
                store: store.clone(),
                user: "dana".into(),
                token: Some("demo-dana-token".into()),
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
        direct(store, policy, project, sql)
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

/// The memory pool is in force end to end: a question whose aggregate needs
/// more than the policy's `memory_mb` is refused by `execution_failed`,
/// releases nothing, tells the researcher only that it could not be
/// completed, and leaves DataFusion's reason to the audit log; under the
/// shipped pool the same question is answered.
#[test]
fn a_question_past_the_memory_pool_fails_closed() {
    let c = collected_with_ndoo(2, 2000, 83, 23);
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/tre.toml"))
            .unwrap();
    assert!(shipped.contains("memory_mb = 2048"));
    let tiny = dir.path().join("tre.toml");
    std::fs::write(&tiny, shipped.replace("memory_mb = 2048", "memory_mb = 1")).unwrap();
    let sql = "SELECT snomedct_code, count(DISTINCT patient_id) AS n FROM clinical_events GROUP BY snomedct_code";

    let o = query_as_alice(&c.store, &[sql]);
    assert!(o.status.success(), "{}", stderr(&o));

    let o = query_as_alice(&c.store, &["--policy", tiny.to_str().unwrap(), sql]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    let said = stderr(&o);
    assert!(said.contains("refused by rule execution_failed"), "{said}");
    assert!(!said.contains("Resources exhausted"), "{said}");
    let log = std::fs::read_to_string(c.store.join("audit/log.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["entry"]["outcome"], "failed", "{last}");
    assert!(
        last["entry"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("Resources exhausted")),
        "{last}"
    );
}
