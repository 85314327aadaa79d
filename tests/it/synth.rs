//! `gpdp synth`, driven through the real binary: files and columns of
//! docs/design.md §2, NHS numbers, the bad-row catalogue, opt-out patterns, the
//! summary against the files, determinism, and refusals of bad arguments.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::OnceLock;

use crate::common::*;

const PRACTICES: u32 = 5;
const PATIENTS: u64 = 4000;

/// One population shared by the read-only tests in this file.
fn data() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        synth(&dir.path().join("x"), PRACTICES, PATIENTS, 7);
        dir
    })
    .path()
    .join("x")
    .leak()
}

fn summary(root: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(root.join("truth/summary.json")).unwrap()).unwrap()
}

fn bad_rows(root: &Path) -> HashMap<(String, String, usize), String> {
    Csv::read(&root.join("truth/bad_rows.csv"))
        .rows
        .into_iter()
        .map(|(_, r)| {
            (
                (r[0].clone(), r[1].clone(), r[2].parse().unwrap()),
                r[3].clone(),
            )
        })
        .collect()
}

#[test]
fn writes_every_file_with_the_documented_columns() {
    let root = data();
    let expect = [
        (
            "patients.csv",
            "nhs_number,given_name,family_name,date_of_birth,sex,postcode,ethnicity,registration_start,registration_end,date_of_death",
        ),
        (
            "clinical_events.csv",
            "nhs_number,date,snomedct_code,numeric_value,free_text",
        ),
        (
            "medications.csv",
            "nhs_number,date,dmd_code,quantity,free_text",
        ),
    ];
    let dirs = practice_dirs(root);
    assert_eq!(dirs.len(), PRACTICES as usize);
    for dir in &dirs {
        let code = dir.file_name().unwrap().to_str().unwrap();
        assert!(
            code.len() == 6
                && code.as_bytes()[0].is_ascii_uppercase()
                && code[1..].bytes().all(|b| b.is_ascii_digit()),
            "ODS-like code {code}"
        );
        for (file, header) in expect {
            assert_eq!(
                Csv::read(&dir.join(file)).header.join(","),
                header,
                "{file}"
            );
        }
    }
    assert_eq!(
        Csv::read(&root.join("national/ndoo.csv")).header,
        ["nhs_number"]
    );
    assert_eq!(
        Csv::read(&root.join("reference/postcode_lsoa.csv")).header,
        ["postcode", "lsoa_code", "imd_decile"]
    );
    let truth = Csv::read(&root.join("truth/patients.csv"));
    assert_eq!(
        &truth.header[..10],
        [
            "nhs_number",
            "practice",
            "registered_at_extract",
            "type1_at_extract",
            "ndoo",
            "deceased",
            "age_band",
            "sex",
            "ethnicity",
            "imd_decile"
        ]
    );
    assert_eq!(
        Csv::read(&root.join("truth/bad_rows.csv")).header,
        ["practice", "table", "line", "reason"]
    );
}

/// Every row whose NHS number fails Modulus 11 is in the catalogue, and every
/// catalogued row really is bad in the way it says.
#[test]
fn bad_rows_are_exactly_the_catalogue() {
    let root = data();
    let catalogue = bad_rows(root);
    assert!(
        catalogue.len() > 20,
        "a small share of bad rows exists: {}",
        catalogue.len()
    );
    let mut seen = HashSet::new();
    for dir in practice_dirs(root) {
        let practice = dir.file_name().unwrap().to_str().unwrap().to_owned();
        for (table, date_col) in [("patients", 3), ("clinical_events", 1), ("medications", 1)] {
            let csv = Csv::read(&dir.join(format!("{table}.csv")));
            for (line, row) in &csv.rows {
                let key = (practice.clone(), table.to_owned(), *line);
                let arity_ok = row.len() == csv.header.len();
                let nhs_ok = nhs_valid(&row[0]);
                let date_ok = row
                    .get(date_col)
                    .is_some_and(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").is_ok());
                let actual = if !arity_ok {
                    Some("wrong_column_count")
                } else if row[0].is_empty() {
                    Some("missing_nhs_number")
                } else if !nhs_ok {
                    Some("invalid_nhs_number")
                } else if !date_ok {
                    Some("malformed_date")
                } else {
                    None
                };
                match (catalogue.get(&key), actual) {
                    (None, None) => {}
                    (Some(reason), Some(found)) => {
                        assert_eq!(reason, found, "{key:?}");
                        seen.insert(key);
                    }
                    (listed, found) => {
                        panic!("{key:?}: catalogue says {listed:?}, row is {found:?}: {row:?}")
                    }
                }
            }
        }
    }
    assert_eq!(seen.len(), catalogue.len(), "every catalogued row exists");
    let reasons: BTreeSet<_> = catalogue.values().cloned().collect();
    assert_eq!(
        reasons.len(),
        4,
        "all four kinds of bad row occur: {reasons:?}"
    );
}

#[test]
fn nhs_numbers_are_valid_unique_per_person_and_in_the_999_range() {
    let root = data();
    let truth = Csv::read(&root.join("truth/patients.csv"));
    let persons: HashSet<_> = truth.rows.iter().map(|(_, r)| r[0].clone()).collect();
    assert_eq!(persons.len() as u64, PATIENTS);
    assert!(persons.iter().all(|n| nhs_valid(n) && n.starts_with("999")));
    // Movers: the same number at two practices with registrations that do not overlap.
    let mut regs: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for dir in practice_dirs(root) {
        let csv = Csv::read(&dir.join("patients.csv"));
        let bad: HashSet<usize> = bad_rows(root)
            .keys()
            .filter(|k| k.1 == "patients" && dir.ends_with(&k.0))
            .map(|k| k.2)
            .collect();
        for (line, r) in &csv.rows {
            if !bad.contains(line) {
                regs.entry(r[0].clone())
                    .or_default()
                    .push((r[7].clone(), r[8].clone()));
            }
        }
    }
    let movers: Vec<_> = regs.values().filter(|v| v.len() == 2).collect();
    assert!(movers.len() > 100, "about 8% move: {}", movers.len());
    assert!(regs.values().all(|v| v.len() <= 2));
    for v in movers {
        let (a, b) = if v[0].0 < v[1].0 {
            (&v[0], &v[1])
        } else {
            (&v[1], &v[0])
        };
        assert!(
            !a.1.is_empty() && a.1 < b.0,
            "non-overlapping registrations: {v:?}"
        );
    }
}

/// Type 1 status in the truth agrees with the latest-code rule applied,
/// independently, to each practice's own clinical events; the patterns the
/// issue asks for all occur.
#[test]
fn type1_truth_follows_the_latest_code_rule() {
    let root = data();
    let (dissent, withdrawn) = ("827241000000103", "827261000000102");
    let truth = Csv::read(&root.join("truth/patients.csv"));
    let mut codes: HashMap<(String, String), Vec<(String, bool)>> = HashMap::new();
    for dir in practice_dirs(root) {
        let practice = dir.file_name().unwrap().to_str().unwrap().to_owned();
        for r in Csv::read(&dir.join("clinical_events.csv")).records() {
            if r["snomedct_code"] == dissent || r["snomedct_code"] == withdrawn {
                codes
                    .entry((r["nhs_number"].clone(), practice.clone()))
                    .or_default()
                    .push((r["date"].clone(), r["snomedct_code"] == dissent));
            }
        }
    }
    let rule = |v: &Vec<(String, bool)>| {
        let last = v.iter().map(|c| &c.0).max().unwrap();
        v.iter().any(|c| &c.0 == last && c.1)
    };
    let (mut out, mut withdrew, mut ties, mut elsewhere) = (0, 0, 0, 0);
    let mut anywhere: HashMap<String, bool> = HashMap::new();
    for r in truth.records() {
        let key = (r["nhs_number"].clone(), r["practice"].clone());
        let expected = codes.get(&key).is_some_and(rule);
        assert_eq!(
            r["type1_at_extract"] == "true",
            expected,
            "{key:?}: {:?}",
            codes.get(&key)
        );
        out += usize::from(expected);
        if let Some(v) = codes.get(&key) {
            withdrew += usize::from(!expected);
            let last = v.iter().map(|c| &c.0).max().unwrap();
            ties += usize::from(
                v.iter()
                    .filter(|c| &c.0 == last)
                    .map(|c| c.1)
                    .collect::<HashSet<_>>()
                    .len()
                    == 2,
            );
        }
        if r["type1_anywhere"] == "true" && r["type1_at_extract"] == "false" {
            elsewhere += 1;
        }
        *anywhere.entry(r["nhs_number"].clone()).or_default() |= expected;
    }
    assert!(
        withdrew > 0 && ties > 0 && elsewhere > 0,
        "withdrew {withdrew}, ties {ties}, recorded elsewhere {elsewhere}"
    );
    let share = anywhere.values().filter(|v| **v).count() as f64 / PATIENTS as f64;
    assert!(
        (0.015..0.05).contains(&share),
        "about 3% opted out: {share}"
    );
    let s = summary(root);
    assert_eq!(s["counts"]["type1"]["opted_out_registrations"], out);
}

#[test]
fn summary_matches_the_files() {
    let root = data();
    let s = &summary(root)["counts"];
    let truth = Csv::read(&root.join("truth/patients.csv"));
    assert_eq!(s["registrations"], truth.rows.len());
    assert_eq!(s["persons"], PATIENTS);
    let ndoo = Csv::read(&root.join("national/ndoo.csv"));
    assert_eq!(s["ndoo"]["persons"], ndoo.rows.len());
    let ndoo_in_truth: HashSet<_> = truth
        .records()
        .into_iter()
        .filter(|r| r["ndoo"] == "true")
        .map(|r| r["nhs_number"].clone())
        .collect();
    let ndoo_listed: HashSet<_> = ndoo.rows.iter().map(|(_, r)| r[0].clone()).collect();
    assert_eq!(ndoo_in_truth, ndoo_listed);
    let share = ndoo_listed.len() as f64 / PATIENTS as f64;
    assert!(
        (0.035..0.07).contains(&share),
        "about 5% on the NDOO list: {share}"
    );

    let mut rows: BTreeMap<&str, u64> = BTreeMap::new();
    for dir in practice_dirs(root) {
        for table in ["patients", "clinical_events", "medications"] {
            *rows.entry(table).or_default() +=
                Csv::read(&dir.join(format!("{table}.csv"))).rows.len() as u64;
        }
    }
    for (table, n) in &rows {
        assert_eq!(s["rows"][table], *n, "{table}");
    }
    assert_eq!(s["bad_rows"]["total"], bad_rows(root).len());
    let registered = truth
        .records()
        .iter()
        .filter(|r| r["registered_at_extract"] == "true")
        .count();
    assert_eq!(s["registered_at_extract"], registered);
    assert_eq!(
        s["deaths"],
        truth
            .records()
            .iter()
            .filter(|r| r["deceased"] == "true")
            .map(|r| r["nhs_number"].clone())
            .collect::<HashSet<_>>()
            .len()
    );
}

/// Prevalences near published English figures (adults): wide bands, since
/// the test population is small.
#[test]
fn prevalence_is_realistic() {
    let s = &summary(data())["counts"]["conditions"];
    for (condition, lo, hi) in [
        ("diabetes", 0.045, 0.10),
        ("hypertension", 0.10, 0.20),
        ("asthma", 0.04, 0.09),
        ("depression", 0.09, 0.17),
        ("copd", 0.008, 0.04),
    ] {
        let share = s[condition]["share_of_adults"].as_f64().unwrap();
        assert!((lo..hi).contains(&share), "{condition}: {share}");
    }
    let sensitive = &summary(data())["counts"]["sensitive_events"];
    assert!(
        sensitive
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>()
            > 10
    );
}

/// Free text mentions names and postcodes (what de-identification must remove),
/// and quoting keeps it one field.
#[test]
fn free_text_contains_identifiers() {
    let root = data();
    let dir = &practice_dirs(root)[0];
    let names: HashMap<String, String> = Csv::read(&dir.join("patients.csv"))
        .records()
        .into_iter()
        .map(|r| (r["nhs_number"].clone(), r["family_name"].clone()))
        .collect();
    let texts: Vec<_> = Csv::read(&dir.join("clinical_events.csv"))
        .records()
        .into_iter()
        .filter(|r| !r["free_text"].is_empty())
        .collect();
    assert!(texts.len() > 10);
    assert!(texts.iter().any(|r| {
        names
            .get(&r["nhs_number"])
            .is_some_and(|n| r["free_text"].contains(n.as_str()))
    }));
    assert!(
        texts.iter().any(|r| r["free_text"].contains(", ")),
        "some free text holds commas"
    );
}

#[test]
fn same_seed_same_bytes_other_seed_other_data_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    synth(&a, 3, 600, 11);
    let o = run(&[
        "synth",
        "--out",
        b.to_str().unwrap(),
        "--practices",
        "3",
        "--patients",
        "600",
        "--seed",
        "11",
        "--threads",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    synth(&c, 3, 600, 12);
    let (ta, tb, tc) = (tree(&a), tree(&b), tree(&c));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (path, bytes) in &ta {
        assert!(
            tb[path] == *bytes,
            "{} differs between runs",
            path.display()
        );
    }
    assert_ne!(
        ta[Path::new("truth/patients.csv")],
        tc[Path::new("truth/patients.csv")]
    );
}

/// The committed sample in synthetic-data/sample is what this generator
/// makes; if the model changes on purpose, regenerate it with the command in
/// synthetic-data/README.md.
#[test]
fn committed_sample_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sample");
    synth(&out, 3, 300, 2026);
    let committed = tree(&Path::new(env!("CARGO_MANIFEST_DIR")).join("synthetic-data/sample"));
    let fresh = tree(&out);
    assert_eq!(
        committed.keys().collect::<Vec<_>>(),
        fresh.keys().collect::<Vec<_>>()
    );
    for (path, bytes) in &fresh {
        assert!(
            committed[path] == *bytes,
            "{} differs from the committed sample",
            path.display()
        );
    }
}

#[test]
fn bad_arguments_exit_2_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let out_s = out.to_str().unwrap();
    for (args, message) in [
        (vec!["--practices", "0"], "--practices must be at least 1"),
        (
            vec!["--practices", "5", "--patients", "3"],
            "must be at least --practices",
        ),
        (vec!["--start-year", "2030"], "--start-year"),
    ] {
        let o = run(&[&["synth", "--out", out_s][..], &args].concat());
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(stderr(&o).contains(message), "{args:?}: {}", stderr(&o));
        assert!(!out.exists(), "nothing written for {args:?}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no staging left behind"
    );

    // An --out that already holds data is never touched.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    let o = run(&["synth", "--out", out_s, "--patients", "50"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);

    // Unwritable destination.
    let o = run(&[
        "synth",
        "--out",
        "/proc/gpdp-cannot-write-here",
        "--patients",
        "50",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    // A bad policy file.
    let policy = dir.path().join("p.toml");
    std::fs::write(
        &policy,
        "version = 1\n[type1]\ndissent_codes = []\nwithdrawn_codes = [\"1\"]\n",
    )
    .unwrap();
    let o = run(&[
        "synth",
        "--out",
        dir.path().join("p").to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("p.toml"), "{}", stderr(&o));

    // An empty directory is fine.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    synth(&empty, 1, 20, 1);
    assert!(empty.join("truth/summary.json").exists());
}

#[test]
fn type1_codes_come_from_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.toml");
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/collection.toml"),
    )
    .unwrap();
    let text = shipped
        .replace(
            "dissent_codes = [\"827241000000103\"]",
            "dissent_codes = [\"111\"]",
        )
        .replace(
            "withdrawn_codes = [\"827261000000102\"]",
            "withdrawn_codes = [\"222\"]",
        );
    std::fs::write(&policy, text).unwrap();
    let out = dir.path().join("x");
    let o = run(&[
        "synth",
        "--out",
        out.to_str().unwrap(),
        "--patients",
        "3000",
        "--practices",
        "2",
        "--policy",
        policy.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let codes: HashSet<String> = practice_dirs(&out)
        .iter()
        .flat_map(|d| Csv::read(&d.join("clinical_events.csv")).records())
        .map(|r| r["snomedct_code"].clone())
        .collect();
    assert!(codes.contains("111") && codes.contains("222"));
    assert!(!codes.contains("827241000000103"));
}

/// Provider extracts (docs/design.md §9): ehrQL's columns; one linkage-truth row per
/// provider record that says, correctly, whose it is and why it does or
/// does not link; deaths that agree with the GP record but for the
/// disagreements and registration delays the summary counts; and the
/// biases the model claims (emergency admissions by deprivation, linkage
/// failures by ethnicity, admissions by age).
#[test]
fn provider_extracts_agree_with_the_gp_population_and_their_linkage_truth() {
    let root = data();
    let apcs = Csv::read(&root.join("linked/apcs.csv"));
    assert_eq!(
        apcs.header.join(","),
        "nhs_number,apcs_ident,admission_date,discharge_date,admission_method,primary_diagnosis,all_diagnoses,all_procedures,days_in_critical_care,discharge_destination"
    );
    let ons = Csv::read(&root.join("linked/ons_deaths.csv"));
    let mut want = vec!["nhs_number", "date", "underlying_cause_of_death"];
    let causes: Vec<String> = (1..=15).map(|k| format!("cause_of_death_{k:02}")).collect();
    want.extend(causes.iter().map(String::as_str));
    want.push("place");
    assert_eq!(ons.header, want);
    let linkage = Csv::read(&root.join("truth/linkage.csv"));
    assert_eq!(
        linkage.header.join(","),
        "source,line,person,linkable,reason,age_band,sex,ethnicity,imd_decile"
    );

    // The GP side: who is registered anywhere, and their recorded deaths.
    let registered: HashSet<String> = Csv::read(&root.join("truth/patients.csv"))
        .records()
        .into_iter()
        .map(|r| r["nhs_number"].clone())
        .collect();
    let mut gp_death: HashMap<String, String> = HashMap::new();
    for dir in practice_dirs(root) {
        for r in Csv::read(&dir.join("patients.csv")).records() {
            if !r["date_of_death"].is_empty() {
                gp_death.insert(r["nhs_number"].clone(), r["date_of_death"].clone());
            }
        }
    }

    // Every provider record has exactly one truth row, and it is right.
    let files = [("apcs", &apcs), ("ons_deaths", &ons)];
    let mut seen: HashSet<(String, usize)> = HashSet::new();
    let mut reasons: BTreeMap<(String, String), u64> = BTreeMap::new();
    let (mut same_date, mut other_date) = (0u64, 0u64);
    for r in linkage.records() {
        let (source, line) = (r["source"].clone(), r["line"].parse::<usize>().unwrap());
        assert!(
            seen.insert((source.clone(), line)),
            "{source} line {line} twice"
        );
        let file = files.iter().find(|(s, _)| *s == source).unwrap().1;
        let row = &file.rows[line - 1].1;
        let recorded = &row[0];
        let person = &r["person"];
        match r["reason"].as_str() {
            "linked" => assert!(recorded == person && registered.contains(person)),
            "not_registered_with_gp" => {
                assert!(recorded == person && !registered.contains(person));
                assert!(nhs_valid(person));
            }
            "missing_nhs_number" => assert!(recorded.is_empty()),
            "invalid_nhs_number" => assert!(!recorded.is_empty() && !nhs_valid(recorded)),
            other => panic!("reason {other}"),
        }
        assert_eq!(r["linkable"] == "true", r["reason"] == "linked");
        *reasons
            .entry((source.clone(), r["reason"].clone()))
            .or_default() += 1;
        if source == "ons_deaths"
            && let Some(gp) = gp_death.get(person)
        {
            if *gp == row[1] {
                same_date += 1;
            } else {
                other_date += 1;
            }
        }
    }
    assert_eq!(
        seen.len(),
        apcs.rows.len() + ons.rows.len(),
        "a provider record without truth"
    );
    let s = summary(root)["counts"]["linked"].clone();
    assert_eq!(s["apcs_spells"], apcs.rows.len() as u64);
    assert_eq!(s["ons_deaths_registered"], ons.rows.len() as u64);
    for (source, key) in [
        ("apcs", "apcs_by_reason"),
        ("ons_deaths", "ons_deaths_by_reason"),
    ] {
        for reason in [
            "linked",
            "not_registered_with_gp",
            "missing_nhs_number",
            "invalid_nhs_number",
        ] {
            let n = reasons
                .get(&(source.to_owned(), reason.to_owned()))
                .copied()
                .unwrap_or(0);
            assert_eq!(s[key][reason], n, "{source} {reason}");
        }
    }
    // Every failure kind occurs; most records link.
    let linked = reasons[&("apcs".to_owned(), "linked".to_owned())] as f64;
    assert!(linked / apcs.rows.len() as f64 > 0.9, "{reasons:?}");
    for reason in [
        "not_registered_with_gp",
        "missing_nhs_number",
        "invalid_nhs_number",
    ] {
        assert!(
            reasons.contains_key(&("apcs".to_owned(), reason.to_owned())),
            "{reason}"
        );
    }

    // Deaths: nearly every GP death is registered, mostly on the same date;
    // the summary counts those that differ and those not yet registered.
    let gp_deaths_registered = same_date + other_date;
    assert_eq!(
        gp_deaths_registered + s["gp_deaths_not_yet_registered"].as_u64().unwrap(),
        gp_death.len() as u64,
        "every GP death is registered or counted as not yet"
    );
    assert!(other_date as f64 <= 0.1 * gp_deaths_registered as f64 + 3.0);
    assert!(same_date as f64 >= 0.85 * gp_death.len() as f64);
    assert!(s["ons_death_not_in_gp_record"].as_u64().unwrap() > 0);

    // The biases: emergency admissions by deprivation, linkage failures by
    // ethnicity, admissions by age.
    let apcs_truth: Vec<_> = linkage
        .records()
        .into_iter()
        .filter(|r| r["source"] == "apcs")
        .collect();
    let share = |rows: &[&BTreeMap<String, String>],
                 hit: &dyn Fn(&BTreeMap<String, String>) -> bool| {
        rows.iter().filter(|r| hit(r)).count() as f64 / rows.len().max(1) as f64
    };
    let method = |r: &BTreeMap<String, String>| -> String {
        apcs.rows[r["line"].parse::<usize>().unwrap() - 1].1[4].clone()
    };
    let deprived: Vec<_> = apcs_truth
        .iter()
        .filter(|r| r["imd_decile"].parse::<u8>().unwrap() <= 3)
        .collect();
    // Five practices cover few areas in deciles 8-10: compare with 6-10.
    let affluent: Vec<_> = apcs_truth
        .iter()
        .filter(|r| r["imd_decile"].parse::<u8>().unwrap() >= 6)
        .collect();
    let emergency = |r: &BTreeMap<String, String>| method(r).starts_with('2');
    assert!(
        share(&deprived, &emergency) > share(&affluent, &emergency) + 0.03,
        "emergency share {} (IMD 1-3) vs {} (IMD 6-10)",
        share(&deprived, &emergency),
        share(&affluent, &emergency)
    );
    let registered_rows: Vec<_> = apcs_truth
        .iter()
        .filter(|r| r["reason"] != "not_registered_with_gp")
        .collect();
    let white: Vec<_> = registered_rows
        .iter()
        .copied()
        .filter(|r| r["ethnicity"] == "White")
        .collect();
    let minority: Vec<_> = registered_rows
        .iter()
        .copied()
        .filter(|r| !["White", "Not stated"].contains(&r["ethnicity"].as_str()))
        .collect();
    let failed = |r: &BTreeMap<String, String>| r["reason"] != "linked";
    assert!(
        share(&minority, &failed) > share(&white, &failed),
        "linkage failure {} (ethnic minority groups) vs {} (White)",
        share(&minority, &failed),
        share(&white, &failed)
    );
    let old = apcs_truth
        .iter()
        .filter(|r| ["70-79", "80+"].contains(&r["age_band"].as_str()))
        .count();
    let young = apcs_truth
        .iter()
        .filter(|r| ["16-29"].contains(&r["age_band"].as_str()))
        .count();
    assert!(old > young, "{old} spells at 70+, {young} at 16-29");
}
