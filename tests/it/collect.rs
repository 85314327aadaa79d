//! `gpdp collect`, driven through the real binary on `gpdp synth` extracts
//! and checked against the generator's ground truth: who leaves, what
//! leaves, what is quarantined, idempotence, replacement, bad input, and
//! crashes at any moment.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::*;

const KEY: u8 = 42;

/// One extract collected once, shared by the read-only tests.
fn fixture() -> &'static Collected {
    static F: OnceLock<Collected> = OnceLock::new();
    F.get_or_init(|| collected(4, 3000, 5, KEY))
}

struct Truth {
    /// nhs -> practices where registered
    registrations: Vec<(String, String)>,
    /// persons with a Type 1 dissent in any practice's record
    dissenting: HashSet<String>,
}

fn truth(extract: &Path) -> Truth {
    let csv = Csv::read(&extract.join("truth/patients.csv"));
    let recs = csv.records();
    Truth {
        registrations: recs
            .iter()
            .map(|r| (r["nhs_number"].clone(), r["practice"].clone()))
            .collect(),
        dissenting: recs
            .iter()
            .filter(|r| r["type1_at_extract"] == "true")
            .map(|r| r["nhs_number"].clone())
            .collect(),
    }
}

/// (practice, table, line) of every bad row in the truth's catalogue.
fn bad_row_lines(extract: &Path) -> HashSet<(String, String, usize)> {
    Csv::read(&extract.join("truth/bad_rows.csv"))
        .rows
        .into_iter()
        .map(|(_, r)| (r[0].clone(), r[1].clone(), r[2].parse().unwrap()))
        .collect()
}

/// The codes the shipped policy excludes: the sensitive list and the Type 1 codes.
fn excluded_codes() -> HashSet<String> {
    Csv::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("synthetic-data/codelists/sensitive.csv"))
        .rows
        .into_iter()
        .map(|(_, r)| r[1].clone())
        .chain(["827241000000103".to_owned(), "827261000000102".to_owned()])
        .collect()
}

/// The store holds exactly the registrations the truth says should leave:
/// every registration of a person with no Type 1 dissent at any practice
/// (a dissent at one practice deletes the person's data from all of them).
#[test]
fn store_holds_exactly_the_patients_who_should_leave() {
    let f = fixture();
    let t = truth(&f.extract);
    assert!(!t.dissenting.is_empty());
    let expected: HashSet<([u8; 32], [u8; 32])> = t
        .registrations
        .iter()
        .filter(|(nhs, _)| !t.dissenting.contains(nhs))
        .map(|(nhs, practice)| (pseudonym(KEY, nhs), practice_pseudonym(KEY, practice)))
        .collect();
    let batches = read_table(&f.store, "patients");
    let ids = pseudonym_column(&batches, "patient_id");
    let practices = pseudonym_column(&batches, "practice_id");
    let found: HashSet<([u8; 32], [u8; 32])> = ids.into_iter().zip(practices).collect();
    assert_eq!(
        found.len(),
        batches.iter().map(|b| b.num_rows()).sum::<usize>(),
        "duplicate registration"
    );
    assert_eq!(found.len(), expected.len());
    assert!(
        found == expected,
        "the collected registrations differ from the truth"
    );

    // No Type 1 patient's pseudonym in any data table.
    let banned: HashSet<[u8; 32]> = t.dissenting.iter().map(|n| pseudonym(KEY, n)).collect();
    for table in ["patients", "clinical_events", "medications"] {
        let ids = patient_ids(&read_table(&f.store, table));
        assert!(!ids.is_empty());
        assert!(
            ids.iter().all(|id| !banned.contains(id)),
            "a Type 1 patient's row is in {table}"
        );
    }
    // Their pseudonyms are in the tombstones, and only theirs.
    let m = manifest(&f.store);
    let tomb_path = f.store.join(m["tombstones"]["path"].as_str().unwrap());
    let file = std::fs::File::open(tomb_path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let tombs: HashSet<[u8; 32]> = patient_ids(&reader.map(|b| b.unwrap()).collect::<Vec<_>>())
        .into_iter()
        .collect();
    assert_eq!(tombs, banned);
}

/// Row counts per table equal the truth's good rows of patients who leave,
/// less the codes the policy excludes (sensitive codes and Type 1 codes).
#[test]
fn rows_out_match_the_good_rows_of_patients_who_leave() {
    let f = fixture();
    let t = truth(&f.extract);
    let bad = bad_row_lines(&f.extract);
    let excluded = excluded_codes();
    let mut expected: BTreeMap<&str, usize> = BTreeMap::new();
    for dir in practice_dirs(&f.extract) {
        let practice = dir.file_name().unwrap().to_str().unwrap().to_owned();
        for (table, code_col) in [
            ("patients", None),
            ("clinical_events", Some(2)),
            ("medications", Some(2)),
        ] {
            let csv = Csv::read(&dir.join(format!("{table}.csv")));
            let n = csv
                .rows
                .iter()
                .filter(|(line, r)| {
                    !bad.contains(&(practice.clone(), table.to_owned(), *line))
                        && !t.dissenting.contains(&r[0])
                })
                .filter(|(_, r)| code_col.is_none_or(|c| !excluded.contains(&r[c])))
                .count();
            *expected.entry(table).or_default() += n;
        }
    }
    for (table, n) in expected {
        let got: usize = read_table(&f.store, table)
            .iter()
            .map(|b| b.num_rows())
            .sum();
        assert_eq!(got, n, "{table}");
    }
}

/// At the source: each practice's receipt counts exactly the good rows of
/// its patients without a Type 1 dissent *in that practice's record* as
/// leaving, and the dissenters' rows as withheld — so they never left, rather
/// than being deleted after arrival.
#[test]
fn each_practice_withholds_its_type1_patients_at_source() {
    let f = fixture();
    let bad = bad_row_lines(&f.extract);
    let excluded = excluded_codes();
    let dissent_here: HashSet<(String, String)> = Csv::read(&f.extract.join("truth/patients.csv"))
        .records()
        .into_iter()
        .filter(|r| r["type1_at_extract"] == "true")
        .map(|r| (r["nhs_number"].clone(), r["practice"].clone()))
        .collect();
    let dissent_anywhere: HashSet<String> = dissent_here.iter().map(|(n, _)| n.clone()).collect();
    let m = manifest(&f.store);
    for dir in practice_dirs(&f.extract) {
        let practice = dir.file_name().unwrap().to_str().unwrap().to_owned();
        let receipt: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                f.store
                    .join(m["batches"][&practice]["receipt"].as_str().unwrap()),
            )
            .unwrap(),
        )
        .unwrap();
        let withheld_patients = dissent_here.iter().filter(|(_, p)| *p == practice).count();
        let mut withheld_elsewhere = 0;
        assert_eq!(
            receipt["type1_excluded_patients"], withheld_patients,
            "{practice}"
        );
        for (table, code_col) in [
            ("patients", None),
            ("clinical_events", Some(2)),
            ("medications", Some(2)),
        ] {
            let csv = Csv::read(&dir.join(format!("{table}.csv")));
            let good: Vec<_> = csv
                .rows
                .iter()
                .filter(|(line, _)| !bad.contains(&(practice.clone(), table.to_owned(), *line)))
                .collect();
            let (held, left): (Vec<_>, Vec<_>) = good
                .into_iter()
                .partition(|(_, r)| dissent_here.contains(&(r[0].clone(), practice.clone())));
            // Patients who dissent at another practice are held back here too
            // (their tombstone is known before this batch is written).
            let (elsewhere, left): (Vec<_>, Vec<_>) = left
                .into_iter()
                .partition(|(_, r)| dissent_anywhere.contains(&r[0]));
            withheld_elsewhere += elsewhere.len();
            let out = left
                .iter()
                .filter(|(_, r)| code_col.is_none_or(|c| !excluded.contains(&r[c])))
                .count();
            assert_eq!(
                receipt["rows_out"][table], out,
                "{practice} {table} rows out"
            );
            assert_eq!(
                receipt["type1_withheld_rows"][table],
                held.len(),
                "{practice} {table} withheld"
            );
        }
        assert_eq!(
            receipt["withheld_by_tombstone"]["rows"], withheld_elsewhere,
            "{practice}"
        );
    }
    assert!(
        total_elsewhere(&f.store) > 0,
        "some movers dissent at their other practice"
    );
}

fn total_elsewhere(store: &Path) -> u64 {
    let m = manifest(store);
    m["batches"]
        .as_object()
        .unwrap()
        .values()
        .map(|b| {
            let r: serde_json::Value = serde_json::from_slice(
                &std::fs::read(store.join(b["receipt"].as_str().unwrap())).unwrap(),
            )
            .unwrap();
            r["withheld_by_tombstone"]["patients"].as_u64().unwrap()
        })
        .sum()
}

/// Reading every value of every Parquet file finds no NHS number, name,
/// full postcode, free text or exact date of birth from the extract.
#[test]
fn no_identifier_reaches_the_store() {
    let f = fixture();
    let mut identifiers: HashSet<String> = HashSet::new();
    let mut dobs: HashMap<[u8; 32], String> = HashMap::new();
    for dir in practice_dirs(&f.extract) {
        for r in Csv::read(&dir.join("patients.csv")).records() {
            for col in ["nhs_number", "given_name", "family_name", "postcode"] {
                identifiers.insert(r[col].clone());
            }
            if !r["date_of_birth"].ends_with("-01") {
                dobs.insert(pseudonym(KEY, &r["nhs_number"]), r["date_of_birth"].clone());
            }
        }
        for table in ["clinical_events", "medications"] {
            for r in Csv::read(&dir.join(format!("{table}.csv"))).records() {
                if !r["free_text"].is_empty() {
                    identifiers.insert(r["free_text"].clone());
                }
            }
        }
    }
    identifiers.remove("");
    let mut scanned = 0;
    let mut data_files = Vec::new();
    for entry in walk(&f.store) {
        if entry.extension().is_some_and(|e| e == "parquet") {
            data_files.push(entry);
        }
    }
    assert!(data_files.len() >= 12);
    for path in data_files {
        let file = std::fs::File::open(&path).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
        let text_columns: HashSet<String> = batches
            .first()
            .map(|b| {
                b.schema()
                    .fields()
                    .iter()
                    .filter(|f| f.data_type() == &arrow::datatypes::DataType::Utf8)
                    .map(|f| f.name().clone())
                    .collect()
            })
            .unwrap_or_default();
        let long: Vec<&String> = identifiers.iter().filter(|i| i.len() >= 10).collect();
        for (column, value) in all_values(&batches) {
            scanned += 1;
            assert!(
                !identifiers.contains(&value),
                "{}: column {column} holds an identifier",
                path.display()
            );
            if text_columns.contains(&column) && value.len() >= 10 {
                assert!(
                    !long.iter().any(|i| value.contains(i.as_str())),
                    "{}: {column} contains an identifier",
                    path.display()
                );
            }
        }
        // No patient row carries its patient's exact date of birth anywhere.
        for b in &batches {
            if b.column_by_name("birth_month").is_none() {
                continue;
            }
            let ids = patient_ids(std::slice::from_ref(b));
            let values = all_values(std::slice::from_ref(b));
            let n = b.num_rows();
            for (c, _) in b.schema().fields().iter().enumerate() {
                for (i, id) in ids.iter().enumerate() {
                    if let Some(dob) = dobs.get(id) {
                        assert_ne!(
                            &values[c * n + i].1,
                            dob,
                            "exact date of birth in {}",
                            b.schema().field(c).name()
                        );
                    }
                }
            }
        }
    }
    assert!(scanned > 10_000);
    // The store's text files (manifest, receipts, log) hold no identifiers either.
    for path in walk(&f.store)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json" || e == "jsonl"))
    {
        let text = std::fs::read_to_string(&path).unwrap();
        for id in identifiers.iter().filter(|i| i.len() >= 6) {
            assert!(
                !text.contains(id.as_str()),
                "{} contains an identifier",
                path.display()
            );
        }
    }
    // And the key is in no file of the store.
    for path in walk(&f.store) {
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert!(
            !bytes.windows(32).any(|w| w == [KEY; 32]),
            "{} contains the key",
            path.display()
        );
    }
}

/// Every date column of the GP tables and the rule the shipped policy
/// gives it: (table, extract column, stored column, rule).
const DATE_RULES: [(&str, &str, &str, &str); 6] = [
    ("patients", "date_of_birth", "birth_month", "month"),
    (
        "patients",
        "registration_start",
        "registration_start",
        "month",
    ),
    ("patients", "registration_end", "registration_end", "month"),
    ("patients", "date_of_death", "date_of_death", "month"),
    ("clinical_events", "date", "date", "keep"),
    ("medications", "date", "date", "keep"),
];

/// An extract date as `rule` leaves it, worked out on its text:
/// `1987-08-19` is `1987-08-01` to the month, `1987-01-01` to the year.
fn by_rule(date: &str, rule: &str) -> String {
    match rule {
        _ if date.is_empty() => String::new(),
        "month" => format!("{}-01", &date[..7]),
        "year" => format!("{}-01-01", &date[..4]),
        "keep" => date.to_owned(),
        _ => panic!("no date rule {rule}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every date stored in the Parquet files is its extract date under the
/// rule the policy gives its column: birth, registration and death dates
/// the first of their month, event and prescription dates to the day. Each
/// stored row is found in the extract by its patient and practice (or
/// code) with its dates worked out here from the extract's text; and the
/// shipped policy is pinned to these rules.
#[test]
fn every_stored_date_is_generalised_by_its_policy_rule() {
    use arrow::array::Array;
    let f = fixture();
    let policy: toml::Value = toml::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/collection.toml"),
        )
        .unwrap(),
    )
    .unwrap();
    for (table, column, _, rule) in DATE_RULES {
        let action = &policy["tables"][table][column];
        let named = match action["action"].as_str() {
            Some("generalise") => action["rule"].as_str().unwrap(),
            other => other.unwrap(),
        };
        assert_eq!(
            named, rule,
            "the shipped policy's rule for {table}.{column}"
        );
    }
    let strict = |d: &str| {
        d.is_empty() || (d.len() == 10 && d.as_bytes()[4] == b'-' && d.as_bytes()[7] == b'-')
    };
    for (table, identity) in [
        ("patients", "practice_id"),
        ("clinical_events", "snomedct_code"),
        ("medications", "dmd_code"),
    ] {
        let rules: Vec<_> = DATE_RULES.iter().filter(|r| r.0 == table).collect();
        // Each extract row as it should be stored: patient, practice or
        // code, then its dates by rule.
        let mut expected: HashSet<Vec<String>> = HashSet::new();
        for dir in practice_dirs(&f.extract) {
            let practice = dir.file_name().unwrap().to_str().unwrap().to_owned();
            for r in Csv::read(&dir.join(format!("{table}.csv"))).records() {
                if !rules.iter().all(|(_, c, _, _)| strict(&r[*c])) {
                    continue; // a malformed date: quarantined
                }
                let mut key = vec![hex(&pseudonym(KEY, &r["nhs_number"]))];
                key.push(if identity == "practice_id" {
                    hex(&practice_pseudonym(KEY, &practice))
                } else {
                    r[identity].clone()
                });
                key.extend(rules.iter().map(|(_, c, _, rule)| by_rule(&r[*c], rule)));
                expected.insert(key);
            }
        }
        let mut checked = 0;
        let mut days = HashSet::new();
        for b in read_table(&f.store, table) {
            let ids = patient_ids(std::slice::from_ref(&b));
            let values = |name: &str| -> Vec<String> {
                let col = b.column_by_name(name).unwrap();
                if identity == "practice_id" && name == identity {
                    return pseudonym_column(std::slice::from_ref(&b), name)
                        .iter()
                        .map(|p| hex(p))
                        .collect();
                }
                let f = arrow::util::display::ArrayFormatter::try_new(
                    col.as_ref(),
                    &arrow::util::display::FormatOptions::default(),
                )
                .unwrap();
                (0..col.len()).map(|i| f.value(i).to_string()).collect()
            };
            let columns: Vec<Vec<String>> = std::iter::once(identity)
                .chain(rules.iter().map(|(_, _, stored, _)| *stored))
                .map(values)
                .collect();
            for (i, id) in ids.iter().enumerate() {
                let mut key = vec![hex(id)];
                key.extend(columns.iter().map(|c| c[i].clone()));
                assert!(
                    expected.contains(&key),
                    "{table}: a stored row's dates are not its extract dates by rule: {key:?}"
                );
                days.extend(
                    key[2..]
                        .iter()
                        .filter(|d| d.len() == 10)
                        .map(|d| d[8..].to_owned()),
                );
                checked += 1;
            }
        }
        assert!(checked > 1000, "{table}: {checked} rows");
        // Kept dates keep their days; generalised ones have only the first.
        let kept = rules.iter().all(|r| r.3 == "keep");
        assert_eq!(days.len() > 1, kept, "{table}: the days stored: {days:?}");
    }
}

fn walk(root: &Path) -> Vec<PathBuf> {
    tree(root).into_keys().map(|p| root.join(p)).collect()
}

/// Every catalogued bad row is quarantined with its reason, on the practice
/// side, and counted in the receipt; nothing else is.
#[test]
fn bad_rows_are_quarantined_with_their_reason() {
    let f = fixture();
    let catalogue: HashSet<(String, String, String, String)> =
        Csv::read(&f.extract.join("truth/bad_rows.csv"))
            .rows
            .into_iter()
            .map(|(_, r)| (r[0].clone(), r[1].clone(), r[2].clone(), r[3].clone()))
            .collect();
    let mut listed = HashSet::new();
    for dir in practice_dirs(&f.extract) {
        let practice = dir.file_name().unwrap().to_str().unwrap().to_owned();
        for (_, r) in Csv::read(&f.extract.join(format!("quarantine/{practice}.csv"))).rows {
            listed.insert((practice.clone(), r[0].clone(), r[1].clone(), r[2].clone()));
        }
    }
    assert_eq!(listed, catalogue);
    let m = manifest(&f.store);
    let mut counted: BTreeMap<String, u64> = BTreeMap::new();
    for batch in m["batches"].as_object().unwrap().values() {
        let receipt: serde_json::Value = serde_json::from_slice(
            &std::fs::read(f.store.join(batch["receipt"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        for (k, v) in receipt["quarantined"].as_object().unwrap() {
            *counted.entry(k.clone()).or_default() += v.as_u64().unwrap();
        }
        for field in [
            "practice",
            "batch",
            "rows_in",
            "rows_out",
            "patients_in",
            "patients_out",
            "type1_excluded_patients",
            "quarantined",
            "excluded_codes",
            "started",
            "finished",
        ] {
            assert!(receipt.get(field).is_some(), "receipt lacks {field}");
        }
    }
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for (_, _, _, reason) in &catalogue {
        *expected.entry(reason.clone()).or_default() += 1;
    }
    assert_eq!(counted, expected);
    // Quarantine files stay with the extract, never in the store.
    assert!(
        walk(&f.store)
            .iter()
            .all(|p| !p.to_string_lossy().contains("quarantine"))
    );
}

#[test]
fn the_audit_log_records_each_batch_and_verifies() {
    let f = fixture();
    let log = std::fs::read_to_string(f.store.join("audit/log.jsonl")).unwrap();
    let collects = log
        .lines()
        .filter(|l| l.contains("\"event\":\"collect\""))
        .count();
    assert_eq!(collects, 4);
    let m = manifest(&f.store);
    // Batches are committed in groups: at least one manifest swap, at most one per practice.
    assert!((1..=4).contains(&m["generation"].as_u64().unwrap()));
    assert_eq!(m["key_id"].as_str().unwrap().len(), 16);
    // Pseudonym columns carry no min/max statistics in the footer.
    let path =
        f.store.join(
            m["batches"].as_object().unwrap().values().next().unwrap()["files"]["clinical_events"]
                ["path"]
                .as_str()
                .unwrap(),
        );
    let reader =
        parquet::file::reader::SerializedFileReader::new(std::fs::File::open(path).unwrap())
            .unwrap();
    let meta = parquet::file::reader::FileReader::metadata(&reader);
    let col = meta.row_group(0).column(0);
    assert_eq!(col.column_path().string(), "patient_id");
    assert!(col.statistics().is_none_or(|s| s.min_bytes_opt().is_none()));
    assert!(
        col.dictionary_page_offset().is_some(),
        "patient_id is dictionary-encoded (rows come grouped by patient)"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    for (rel, bytes) in tree(from) {
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(dest, bytes).unwrap();
    }
}

fn snapshot(store: &Path) -> Vec<Vec<String>> {
    ["patients", "clinical_events", "medications"]
        .iter()
        .map(|t| table_rows(store, t))
        .collect()
}

#[test]
fn rerunning_is_a_no_op_and_a_newer_extract_replaces_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let extract = dir.path().join("extract");
    synth(&extract, 3, 600, 9);
    let key = key_file(dir.path(), KEY);
    let store = dir.path().join("store");
    assert!(collect(&extract, &store, &key).status.success());
    let before = tree(&store);
    let o = collect(&extract, &store, &key);
    assert!(o.status.success());
    assert!(
        stdout(&o).matches("unchanged").count() == 3,
        "{}",
        stdout(&o)
    );
    let after = tree(&store);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    assert!(
        before
            .iter()
            .all(|(k, v)| k.ends_with(".lock") || after[k] == *v),
        "re-running changed the store"
    );

    // A newer extract of one practice (its last 100 events gone) replaces its batch.
    let practice = practice_dirs(&extract)[0].clone();
    let events = practice.join("clinical_events.csv");
    let text = std::fs::read_to_string(&events).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&events, lines[..lines.len() - 100].join("\n") + "\n").unwrap();
    let old_batch =
        manifest(&store)["batches"][practice.file_name().unwrap().to_str().unwrap()]["batch"]
            .clone();
    let o = collect(&extract, &store, &key);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).matches("unchanged").count(), 2);
    let m = manifest(&store);
    let entry = &m["batches"][practice.file_name().unwrap().to_str().unwrap()];
    assert_ne!(entry["batch"], old_batch);
    let old = old_batch.as_str().unwrap();
    assert!(
        walk(&store).iter().all(|p| !p
            .to_string_lossy()
            .contains(&format!("tables/clinical_events/{old}"))),
        "the old batch's files are gone"
    );
}

/// Bad key, missing files, bad policy: exit 2 with a clear message, and the store is unchanged.
#[test]
fn bad_input_exits_2_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let extract = dir.path().join("extract");
    synth(&extract, 2, 200, 3);
    let key = key_file(dir.path(), KEY);
    let store = dir.path().join("store");
    assert!(collect(&extract, &store, &key).status.success());
    let before = tree(&store);
    let unchanged = |label: &str| {
        let after = tree(&store);
        assert!(
            before
                .iter()
                .all(|(k, v)| k.ends_with(".lock") || after.get(k) == Some(v))
                && after.len() == before.len(),
            "{label} changed the store"
        );
    };

    // Wrong key length, key readable by others, a different key.
    let short = dir.path().join("short.key");
    std::fs::write(&short, [1u8; 16]).unwrap();
    std::fs::set_permissions(&short, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let open = dir.path().join("open.key");
    std::fs::write(&open, [1u8; 32]).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let other = key_file(dir.path(), 7);
    for (k, message) in [
        (&short, "exactly 32 bytes"),
        (&open, "readable by group or others"),
        (&other, "key id"),
        (&dir.path().join("nope.key"), "cannot read key file"),
    ] {
        let o = collect(&extract, &store, k);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(message), "{}", stderr(&o));
        assert!(
            !stderr(&o).contains(&"01".repeat(16)),
            "the key leaked into an error"
        );
        unchanged(message);
    }

    // Missing extract file; a missing column; an unknown practice.
    let broken = dir.path().join("broken");
    copy_dir(&extract, &broken);
    let p = practice_dirs(&broken)[1].clone();
    std::fs::remove_file(p.join("medications.csv")).unwrap();
    let o = collect(&broken, &store, &key);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("medications.csv"), "{}", stderr(&o));
    unchanged("a missing file");
    std::fs::write(
        p.join("medications.csv"),
        "nhs_number,date,quantity,free_text\n",
    )
    .unwrap();
    let o = collect(&broken, &store, &key);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("no column \"dmd_code\""),
        "{}",
        stderr(&o)
    );
    unchanged("a missing column");
    let o = gpdp()
        .args(collect_args(&extract, &store, &key))
        .args(["--practice", "Q99999"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    unchanged("an unknown practice");

    // A policy that would let a name through.
    let policy = dir.path().join("p.toml");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/collection.toml"),
    )
    .unwrap();
    std::fs::write(
        &policy,
        text.replace(
            "given_name = { action = \"drop\" }",
            "given_name = { action = \"keep\" }",
        ),
    )
    .unwrap();
    let o = gpdp()
        .args(collect_args(&extract, &store, &key))
        .args(["--policy", policy.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("p.toml:") && stderr(&o).contains("given_name"),
        "{}",
        stderr(&o)
    );
    unchanged("a bad policy");
}

/// An unknown column in an extract is dropped and reported, never passed through.
#[test]
fn unknown_columns_are_dropped_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let extract = dir.path().join("extract");
    synth(&extract, 1, 100, 4);
    let p = &practice_dirs(&extract)[0];
    let path = p.join("patients.csv");
    let text = std::fs::read_to_string(&path).unwrap();
    let widened: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                format!("{l},telephone")
            } else {
                format!("{l},07700900123")
            }
        })
        .collect();
    std::fs::write(&path, widened.join("\n") + "\n").unwrap();
    // Bad rows would now have the right width again: drop them for this test.
    let key = key_file(dir.path(), KEY);
    let store = dir.path().join("store");
    let o = gpdp()
        .args(collect_args(&extract, &store, &key))
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        out["receipts"][0]["unknown_columns"]["patients"],
        serde_json::json!(["telephone"])
    );
    assert!(
        all_values(&read_table(&store, "patients"))
            .iter()
            .all(|(c, v)| c != "telephone" && !v.contains("07700900123"))
    );
}

/// Each practice's receipt counts and times its work as it happened:
/// every patient known at the practice was hashed once, and left, was held
/// back by a tombstone, or dissented (a tombstone sent); every excluded-code
/// category it lists excluded rows; every stage took time (none negative),
/// and the batch's seconds cover at least its Parquet writing.
#[test]
fn every_receipt_counts_and_times_its_work() {
    let f = fixture();
    let mut practices = 0;
    let mut excluded = 0;
    for batch in manifest(&f.store)["batches"].as_object().unwrap().values() {
        let receipt: serde_json::Value = serde_json::from_slice(
            &std::fs::read(f.store.join(batch["receipt"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        let Some(stages) = receipt["stage_seconds"].as_object() else {
            continue;
        };
        practices += 1;
        let n = |v: &serde_json::Value| v.as_u64().unwrap();
        assert_eq!(
            n(&receipt["pseudonyms_computed"]),
            n(&receipt["patients_out"])
                + n(&receipt["withheld_by_tombstone"]["patients"])
                + n(&receipt["tombstones_emitted"]),
            "{receipt}"
        );
        for (category, rows) in receipt["excluded_codes"].as_object().unwrap() {
            assert!(n(rows) > 0, "{category}: {receipt}");
            excluded += n(rows);
        }
        for (stage, seconds) in stages {
            assert!(seconds.as_f64().unwrap() > 0.0, "{stage}: {receipt}");
        }
        assert!(
            receipt["seconds"].as_f64().unwrap() >= stages["parquet_write"].as_f64().unwrap(),
            "{receipt}"
        );
    }
    assert!(practices > 0 && excluded > 0);
}

/// A postcode the reference lookup does not know leaves its area empty and
/// is counted in the practice's receipt (`unmatched_postcodes`), one per
/// row: the generator's postcodes are all in its reference (0 before), and
/// three registrations moved to a postcode outside it are counted 3.
#[test]
fn postcodes_outside_the_reference_are_counted_in_the_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let extract = dir.path().join("extract");
    synth(&extract, 1, 100, 4);
    let key = key_file(dir.path(), KEY);
    let unmatched = |store: &Path| -> u64 {
        let o = gpdp()
            .args(collect_args(&extract, store, &key))
            .arg("--json")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        out["receipts"][0]["unmatched_postcodes"].as_u64().unwrap()
    };
    assert_eq!(unmatched(&dir.path().join("before")), 0);

    let p = &practice_dirs(&extract)[0];
    let practice = p.file_name().unwrap().to_str().unwrap().to_owned();
    let bad = bad_row_lines(&extract);
    let path = p.join("patients.csv");
    let text = std::fs::read_to_string(&path).unwrap();
    let column = fields(text.lines().next().unwrap())
        .iter()
        .position(|c| c == "postcode")
        .unwrap();
    let mut moved = 0;
    let lines: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            // Rows well clear of the deliberately bad ones (whichever way
            // their lines are counted), which never reach the lookup.
            let clear = i > 0
                && (i.saturating_sub(1)..=i + 1)
                    .all(|n| !bad.contains(&(practice.clone(), "patients".into(), n)));
            if moved == 3 || !clear || l.contains('"') {
                return l.to_string();
            }
            let mut f = fields(l);
            f[column] = "ZZ9 9ZZ".into();
            moved += 1;
            f.join(",")
        })
        .collect();
    assert_eq!(moved, 3);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    assert_eq!(unmatched(&dir.path().join("after")), 3);
}

/// Killing collection at any moment never leaves partial or duplicated data
/// visible, and a re-run then gives the same store as an uninterrupted run.
/// Each kill's landing is recorded — still running or already finished,
/// and what it left on disk — and at least half must land inside a run
/// that had work to do, one at least while it wrote files: the kill
/// moments are spread over an uninterrupted run's duration, timed here,
/// and a store the kills let finish starts again empty (a re-run of a
/// finished store is a no-op, nothing to interrupt).
#[test]
fn crashes_at_any_moment_leave_the_store_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let extract = dir.path().join("extract");
    synth(&extract, 4, 1500, 8);
    let key = key_file(dir.path(), KEY);
    let clean = dir.path().join("clean");
    let started = Instant::now();
    assert!(collect(&extract, &clean, &key).status.success());
    let mut run_time = started.elapsed();
    let expected = snapshot(&clean);
    let practices = practice_dirs(&extract).len();

    let check_consistent = |store: &Path| {
        if !store.join("manifest.json").exists() {
            return;
        }
        let m = manifest(store);
        for batch in m["batches"].as_object().unwrap().values() {
            for file in batch["files"].as_object().unwrap().values() {
                let bytes = std::fs::read(store.join(file["path"].as_str().unwrap()))
                    .expect("every referenced file exists");
                assert_eq!(bytes.len() as u64, file["bytes"].as_u64().unwrap());
            }
        }
    };

    // Deterministic crash points inside a commit.
    for point in ["before-manifest-swap", "after-manifest-swap"] {
        let store = dir.path().join(format!("fp-{point}"));
        let o = gpdp()
            .args(collect_args(&extract, &store, &key))
            .env("GPDP_FAILPOINT", point)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{point} did not fire");
        check_consistent(&store);
        let o = collect(&extract, &store, &key);
        assert!(o.status.success(), "{point}: {}", stderr(&o));
        assert_eq!(snapshot(&store), expected, "after a crash at {point}");
        let log = std::fs::read_to_string(store.join("audit/log.jsonl")).unwrap();
        if point == "after-manifest-swap" {
            assert!(
                log.contains("\"recovered\":true"),
                "the lost audit entry was recovered"
            );
        }
    }

    // SIGKILL at moments spread over a run, several times on the same store.
    let store = dir.path().join("killed");
    let mut landings = Vec::new();
    for i in 0..16u32 {
        let before = committed_batches(&store);
        let staged_before = unreferenced_files(&store);
        // From the start of a run to a little past its end.
        let at = run_time.mul_f64((f64::from(i % 8) + 0.5) * 1.2 / 8.0);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpdp"));
        cmd.args(collect_args(&extract, &store, &key))
            .stdout(std::process::Stdio::null());
        let (killed, took) = kill_at(&mut cmd, at);
        let after = committed_batches(&store);
        landings.push(Landing {
            at,
            killed,
            // Work to do: not every practice committed yet.
            pending: before < practices,
            committed: (before, after),
            staged: unreferenced_files(&store)
                .difference(&staged_before)
                .count(),
        });
        check_consistent(&store);
        if !killed && before == 0 {
            // A whole run from empty, timed: aim the next kills inside one.
            run_time = took;
        }
        if after == practices {
            std::fs::remove_dir_all(&store).unwrap();
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
    let o = collect(&extract, &store, &key);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(snapshot(&store), expected);
    // Nothing unreferenced is left behind.
    assert_eq!(unreferenced_files(&store), HashSet::new(), "stray files");
}

/// Where one SIGKILL landed.
struct Landing {
    at: Duration,
    /// The process was still running when the signal came.
    killed: bool,
    /// The run had practices to commit.
    pending: bool,
    /// Practices committed before and after.
    committed: (usize, usize),
    /// Data files the killed run had written and not yet committed.
    staged: usize,
}

impl Landing {
    /// Inside a run with work to do.
    fn inside(&self) -> bool {
        self.killed && self.pending
    }
}

impl std::fmt::Display for Landing {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "kill at {:>4} ms: {}, {} -> {} practices committed, {} staged files left",
            self.at.as_millis(),
            match (self.killed, self.pending) {
                (true, true) => "inside the run",
                (true, false) => "inside a run with nothing to do",
                (false, _) => "after it ended",
            },
            self.committed.0,
            self.committed.1,
            self.staged
        )
    }
}

/// Runs `cmd` and sends it SIGKILL once `at` has passed, unless it has
/// finished (successfully) before: whether the signal landed inside the
/// run, and how long the run lasted.
fn kill_at(cmd: &mut Command, at: Duration) -> (bool, Duration) {
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

/// Practices committed to the store (0 with no store yet).
fn committed_batches(store: &Path) -> usize {
    if !store.join("manifest.json").exists() {
        return 0;
    }
    manifest(store)["batches"].as_object().unwrap().len()
}

/// Data files under `tables/` that the manifest does not reference: a
/// killed run's staged work (the next writer removes them).
fn unreferenced_files(store: &Path) -> HashSet<String> {
    if !store.join("tables").exists() {
        return HashSet::new();
    }
    let referenced: HashSet<String> = if store.join("manifest.json").exists() {
        manifest(store)["batches"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|b| {
                b["files"]
                    .as_object()
                    .unwrap()
                    .values()
                    .map(|f| f["path"].as_str().unwrap().to_owned())
            })
            .collect()
    } else {
        HashSet::new()
    };
    walk(&store.join("tables"))
        .iter()
        .map(|p| {
            p.strip_prefix(store)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|rel| !referenced.contains(rel))
        .collect()
}
