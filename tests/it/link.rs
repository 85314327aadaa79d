//! `gpdp link` (issue 16) as a provider and a TRE operator drive it:
//! hospital spells and death registrations pseudonymised with the GP key so
//! they join, quarantined against the truth, no identifier stored, a Type 1
//! opt-out leaving them in place and the NDOO removing them from projects
//! it applies to, and the linked views answering under the grammar.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use crate::common::*;

/// The truth's provider records of `source`, by reason.
fn truth_rows(extract: &Path, source: &str) -> Vec<BTreeMap<String, String>> {
    Csv::read(&extract.join("truth/linkage.csv"))
        .records()
        .into_iter()
        .filter(|r| r["source"] == source)
        .collect()
}

#[test]
fn provider_extracts_link_on_the_gp_pseudonym_quarantine_what_cannot_and_store_no_identifier() {
    let c = collected_with_ndoo(3, 1500, 81, 9);
    let o = link(&c, &["--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let receipts: Vec<serde_json::Value> = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(receipts.len(), 2);

    for (source, r) in ["apcs", "ons_deaths"].iter().zip(&receipts) {
        assert_eq!(r["source"], *source);
        let truth = truth_rows(&c.extract, source);
        let of = |reasons: &[&str]| {
            truth
                .iter()
                .filter(|t| reasons.contains(&t["reason"].as_str()))
                .count() as u64
        };
        // Stored: every record whose NHS number is valid (linkable or not);
        // quarantined, reason by reason: the rest.
        assert_eq!(r["rows_in"], truth.len() as u64, "{source}");
        assert_eq!(
            r["rows_out"],
            of(&["linked", "not_registered_with_gp"]),
            "{source}"
        );
        for reason in ["missing_nhs_number", "invalid_nhs_number"] {
            assert_eq!(
                r["quarantined"][reason].as_u64().unwrap_or(0),
                of(&[reason]),
                "{source} {reason}"
            );
        }
        let m = manifest(&c.store);
        let path = c
            .store
            .join(m["linked"][source]["file"]["path"].as_str().unwrap());
        let batches = read_parquet(&path);
        // The same pseudonyms as GP collection: every linkable record's
        // patient is one of the GP tables' patients when stored there.
        let stored: HashSet<[u8; 32]> = patient_ids(&batches).into_iter().collect();
        let expected: HashSet<[u8; 32]> = truth
            .iter()
            .filter(|t| ["linked", "not_registered_with_gp"].contains(&t["reason"].as_str()))
            .map(|t| pseudonym(9, &t["person"]))
            .collect();
        assert_eq!(stored, expected, "{source}: the patients stored");
        // No NHS number, no spell identifier, in any value.
        let schema = batches[0].schema();
        assert!(schema.column_with_name("nhs_number").is_none());
        assert!(schema.column_with_name("apcs_ident").is_none());
        for (_, value) in all_values(&batches) {
            assert!(
                !nhs_valid(&value),
                "{source}: an NHS number {value} is stored"
            );
        }
        // The quarantine is provider side, line and reason only.
        let q = std::fs::read_to_string(c.extract.join(format!("quarantine/linked-{source}.csv")))
            .unwrap();
        assert_eq!(
            q.lines().count() as u64,
            1 + of(&["missing_nhs_number", "invalid_nhs_number"])
        );
    }
    // The date of death is stored to its month, as the policy says.
    let m = manifest(&c.store);
    let deaths = read_parquet(
        &c.store
            .join(m["linked"]["ons_deaths"]["file"]["path"].as_str().unwrap()),
    );
    for (column, value) in all_values(&deaths) {
        if column == "date" {
            assert!(value.ends_with("-01"), "{value}");
        }
    }

    // Linking again changes nothing; the audit agrees with the truth.
    let generation = manifest(&c.store)["generation"].clone();
    let o = link(&c, &[]);
    assert!(stdout(&o).contains("unchanged"), "{}", stdout(&o));
    assert_eq!(manifest(&c.store)["generation"], generation);
    let o = gpdp().arg("audit").args(c.truth_args()).output().unwrap();
    assert!(o.status.success(), "{}", stdout(&o));
    let out = stdout(&o);
    let line = out
        .lines()
        .find(|l| l.starts_with("linked_records_match_truth"))
        .unwrap();
    assert!(
        line.contains("pass") && line.contains("Type 1 patients, kept"),
        "{line}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("no_rollback") && l.contains("pass"))
    );
}

#[test]
fn a_type1_opt_out_leaves_provider_data_and_the_ndoo_removes_it_from_research_views() {
    let c = collected_with_ndoo(3, 1500, 83, 4);
    let o = link(&c, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let truth = Csv::read(&c.extract.join("truth/patients.csv")).records();
    let linkable: HashSet<String> = truth_rows(&c.extract, "apcs")
        .into_iter()
        .filter(|r| r["reason"] == "linked")
        .map(|r| r["person"].clone())
        .collect();
    let type1: Vec<&String> = truth
        .iter()
        .filter(|r| {
            r["type1_at_extract"] == "true"
                && r["ndoo"] == "false"
                && linkable.contains(&r["nhs_number"])
        })
        .map(|r| &r["nhs_number"])
        .collect();
    let ndoo: Vec<&String> = truth
        .iter()
        .filter(|r| r["ndoo"] == "true" && linkable.contains(&r["nhs_number"]))
        .map(|r| &r["nhs_number"])
        .collect();
    assert!(!type1.is_empty() && !ndoo.is_empty());

    // Per patient, through each project's views: `gpdp optout status` asks
    // the views the TRE builds.
    let status = |nhs: &str| optout_status(&c, nhs);
    let because = |s: &serde_json::Value, project: &str| -> String {
        s["projects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["project"] == project)
            .unwrap()["because"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // Type 1: no GP data, the hospital spells stay (and are reachable in a
    // research project, where they never meet GP data).
    let s = status(type1[0]);
    assert_eq!(s["rows"]["patients"], 0, "{s}");
    assert!(s["rows"]["apcs"].as_u64().unwrap() > 0, "{s}");
    let research = because(&s, "demo-opensafely");
    assert!(
        research.contains("apcs") && !research.contains("patients"),
        "{research}"
    );
    // NDOO: in the store, invisible to the research projects, linked data too.
    let s = status(ndoo[0]);
    assert!(s["rows"]["apcs"].as_u64().unwrap() > 0, "{s}");
    for project in ["demo-opensafely", "demo-research"] {
        assert!(
            because(&s, project).contains("National Data Opt-out"),
            "{s}"
        );
    }
    assert!(because(&s, "demo-planning-exempt").contains("apcs"), "{s}");
}

#[test]
fn linked_views_answer_research_questions_under_the_grammar() {
    let c = collected_with_ndoo(3, 1500, 85, 3);
    let o = link(&c, &["--source", "apcs"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(manifest(&c.store)["linked"].get("ons_deaths").is_none());
    // Emergency admissions by deprivation: released, and equal to the truth
    // computed from the files (rounded to 5, cells of 7 or fewer redacted).
    let o = query_as_alice(
        &c.store,
        &[
            "--format",
            "csv",
            "SELECT p.imd_decile, count(DISTINCT a.patient_id) AS patients FROM apcs a JOIN patients p ON a.patient_id = p.patient_id WHERE a.admission_method IN ('21', '22', '28') GROUP BY p.imd_decile ORDER BY p.imd_decile",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let released: BTreeMap<String, String> = stdout(&o)
        .lines()
        .skip(1)
        .map(|l| {
            let f = fields(l);
            (f[0].clone(), f[1].clone())
        })
        .collect();
    let apcs = Csv::read(&c.extract.join("linked/apcs.csv"));
    let truth = Csv::read(&c.extract.join("truth/patients.csv")).records();
    // A person is out of the research views if on the NDOO or dissenting
    // (Type 1) at any practice; a mover is in each registration's decile.
    let out: HashSet<&String> = truth
        .iter()
        .filter(|r| r["ndoo"] == "true" || r["type1_at_extract"] == "true")
        .map(|r| &r["nhs_number"])
        .collect();
    let mut deciles: BTreeMap<&String, HashSet<&String>> = BTreeMap::new();
    for r in &truth {
        deciles
            .entry(&r["nhs_number"])
            .or_default()
            .insert(&r["imd_decile"]);
    }
    let mut want: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    for (_, row) in &apcs.rows {
        let nhs = &row[0];
        if !row[4].starts_with('2') || out.contains(nhs) {
            continue;
        }
        for d in deciles.get(nhs).into_iter().flatten() {
            want.entry((*d).clone()).or_default().insert(nhs.clone());
        }
    }
    for (decile, patients) in &want {
        let n = patients.len() as u64;
        let shown = released.get(decile).map(String::as_str).unwrap_or("");
        if n <= 7 {
            assert!(
                shown.is_empty() || shown == "[REDACTED]",
                "{decile}: {shown}"
            );
        } else {
            let rounded = (n + 2) / 5 * 5;
            assert_eq!(shown, rounded.to_string(), "decile {decile}: {n} patients");
        }
    }
    // A view of a source not linked yet is there and empty.
    let o = query_as_alice(
        &c.store,
        &["SELECT place, count(*) AS n FROM ons_deaths GROUP BY place"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("(0 rows"), "{}", stdout(&o));
    // Full diagnosis codes may be tested, not released; the spell id is gone.
    for (sql, status, says) in [
        (
            "SELECT primary_diagnosis, count(*) AS n FROM apcs GROUP BY primary_diagnosis",
            3,
            "group_key_not_allowed",
        ),
        (
            "SELECT count(*) AS n FROM apcs WHERE apcs_ident = '1001'",
            2,
            "No field named apcs_ident",
        ),
    ] {
        let o = query_as_alice(&c.store, &[sql]);
        assert_eq!(o.status.code(), Some(status), "{sql}: {}", stdout(&o));
        let rule = says;
        assert!(stderr(&o).contains(rule), "{}", stderr(&o));
    }
}

#[test]
fn the_report_measures_linkage_and_its_bias_against_the_truth() {
    let c = collected_with_ndoo(4, 2500, 87, 8);
    assert!(link(&c, &[]).status.success());
    let out = c._dir.path().join("report");
    let o = report(&c, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("Linked data: linkage quality and its bias"));

    // The truth, independently: a record should link when its person has
    // GP data in the store (any registration without a Type 1 dissent);
    // it links when the provider recorded a valid number.
    let truth = Csv::read(&c.extract.join("truth/patients.csv")).records();
    let dissent: HashSet<&String> = truth
        .iter()
        .filter(|r| r["type1_at_extract"] == "true")
        .map(|r| &r["nhs_number"])
        .collect();
    let stored: HashSet<&String> = truth
        .iter()
        .map(|r| &r["nhs_number"])
        .filter(|n| !dissent.contains(n))
        .collect();
    for s in r["linkage"]["sources"].as_array().unwrap() {
        let source = s["source"].as_str().unwrap();
        let rows = truth_rows(&c.extract, source);
        let should: Vec<_> = rows
            .iter()
            .filter(|t| stored.contains(&t["person"]))
            .collect();
        let linked = should.iter().filter(|t| t["reason"] == "linked").count();
        assert_eq!(s["records"], rows.len() as u64, "{source}");
        assert_eq!(s["of_stored_patients"], should.len() as u64, "{source}");
        assert_eq!(s["linked"], linked as u64, "{source}");
        // By ethnicity, group by group.
        let by = s["by"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == "ethnicity")
            .unwrap();
        for g in by["groups"].as_array().unwrap() {
            let v = g["value"].as_str().unwrap();
            let of: Vec<_> = should.iter().filter(|t| t["ethnicity"] == v).collect();
            assert_eq!(g["of_stored_patients"], of.len() as u64, "{source} {v}");
            assert_eq!(
                g["linked"],
                of.iter().filter(|t| t["reason"] == "linked").count() as u64,
                "{source} {v}"
            );
        }
    }
    // Deaths: most GP deaths are registered with ONS, mostly in the same month.
    let d = &r["linkage"]["deaths"];
    let (gp, registered, same) = (
        d["gp_deaths"].as_u64().unwrap(),
        d["registered"].as_u64().unwrap(),
        d["same_month"].as_u64().unwrap(),
    );
    assert!(gp > 0 && registered <= gp && registered + d["gp_only"].as_u64().unwrap() == gp);
    assert!(registered as f64 >= 0.8 * gp as f64, "{d}");
    assert!(same as f64 >= 0.9 * registered as f64, "{d}");
}
