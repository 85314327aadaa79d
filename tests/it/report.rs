//! `gpdp report` on a small generated population: its figures checked
//! against the truth and against an independent computation over the
//! store's files, and the page checked for every section, charts, and
//! nothing fetched or identifying.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::common::*;
use arrow::array::AsArray;

struct Made {
    c: Collected,
    json: serde_json::Value,
    html: String,
}

fn made() -> Made {
    let c = collected_with_ndoo(3, 1200, 17, 7);
    let out = c._dir.path().join("report");
    let o = report(&c, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    Made { c, json, html }
}

#[test]
fn the_report_matches_the_truth_and_an_independent_computation() {
    let m = made();
    let r = &m.json;
    assert_eq!(r["schema"], "gpdp-report/1");

    // Representativeness: population = registered at extract (truth);
    // research = those with no Type 1 anywhere and not on the NDOO.
    let truth = Csv::read(&m.c.extract.join("truth/patients.csv")).records();
    for d in r["representativeness"]["dimensions"].as_array().unwrap() {
        let name = d["name"].as_str().unwrap();
        let mut want: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for t in truth
            .iter()
            .filter(|t| t["registered_at_extract"] == "true")
        {
            let e = want.entry(t[name].clone()).or_default();
            e.0 += 1;
            if t["type1_anywhere"] == "false" && t["ndoo"] == "false" {
                e.1 += 1;
            }
        }
        let got: BTreeMap<String, (u64, u64)> = d["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                (
                    g["value"].as_str().unwrap().to_owned(),
                    (
                        g["population"].as_u64().unwrap(),
                        g["research"].as_u64().unwrap(),
                    ),
                )
            })
            .collect();
        assert_eq!(got, want, "{name}");
        for g in d["groups"].as_array().unwrap() {
            let share = g["research"].as_f64().unwrap() / g["population"].as_f64().unwrap();
            assert!((g["retained_share"].as_f64().unwrap() - share).abs() < 1e-12);
        }
    }

    // k-anonymity over the stored quasi-identifiers: one record per patient
    // and profile (a patient who moved area has two).
    let batches = read_table(&m.c.store, "patients");
    let mut records: HashSet<([u8; 32], Vec<String>)> = HashSet::new();
    for b in &batches {
        let ids = b
            .column_by_name("patient_id")
            .unwrap()
            .as_fixed_size_binary();
        let cols: Vec<_> = ["birth_month", "sex", "lsoa_code", "ethnicity"]
            .iter()
            .map(|c| {
                arrow::util::display::ArrayFormatter::try_new(
                    b.column_by_name(c).unwrap().as_ref(),
                    &Default::default(),
                )
                .unwrap()
            })
            .collect();
        for i in 0..b.num_rows() {
            let qi = cols.iter().map(|f| f.value(i).to_string()).collect();
            records.insert((ids.value(i).try_into().unwrap(), qi));
        }
    }
    let mut classes: HashMap<Vec<String>, u64> = HashMap::new();
    for (_, qi) in &records {
        *classes.entry(qi.clone()).or_default() += 1;
    }
    let k = &r["reidentification"];
    assert_eq!(k["records"], records.len() as u64);
    let records = records.len() as f64;
    assert_eq!(k["classes"], classes.len() as u64);
    assert_eq!(k["k_anonymity"], *classes.values().min().unwrap());
    let share =
        |f: &dyn Fn(u64) -> bool| classes.values().filter(|n| f(**n)).sum::<u64>() as f64 / records;
    assert!((k["share_unique"].as_f64().unwrap() - share(&|n| n == 1)).abs() < 1e-12);
    assert!((k["share_in_classes_below_5"].as_f64().unwrap() - share(&|n| n < 5)).abs() < 1e-12);
    assert!((k["share_in_classes_below_10"].as_f64().unwrap() - share(&|n| n < 10)).abs() < 1e-12);

    // Opt-outs and collection: from the truth and the receipts.
    let type1_registrations = truth
        .iter()
        .filter(|t| t["type1_at_extract"] == "true")
        .count();
    assert_eq!(r["optouts"]["type1_at_source"], type1_registrations as u64);
    let bad = Csv::read(&m.c.extract.join("truth/bad_rows.csv"))
        .rows
        .len();
    let quarantined: u64 = r["collection"]["quarantined"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(quarantined, bad as u64);
    assert_eq!(
        r["optouts"]["audit"]["passed"], true,
        "{}",
        r["optouts"]["audit"]
    );
    for c in r["collection"]["identifier_checks"].as_array().unwrap() {
        assert_eq!(c["passed"], true, "{c}");
    }
}

#[test]
fn the_page_has_every_section_with_charts_and_nothing_fetched_or_identifying() {
    let m = made();
    for section in [
        "1. De-identification on collection",
        "2. Opt-outs",
        "3. Representativeness",
        "4. Re-identification risk",
        "5. The Trusted Research Environment",
        "6. Throughput and timeliness",
    ] {
        assert!(m.html.contains(section), "no section {section}");
    }
    assert!(m.html.matches("<svg").count() >= 8, "charts missing");
    for forbidden in ["<script", "src=\"http", "href=\"http", "@import", "url("] {
        assert!(
            !m.html.contains(forbidden),
            "the page fetches or runs something: {forbidden}"
        );
    }
    // No NHS number from the extract appears on the page or in the JSON.
    let json_text = m.json.to_string();
    for t in Csv::read(&m.c.extract.join("truth/patients.csv")).records() {
        let n = &t["nhs_number"];
        assert!(!m.html.contains(n.as_str()) && !json_text.contains(n.as_str()));
    }
    // The page shows the JSON's numbers.
    let k = m.json["reidentification"]["k_anonymity"].to_string();
    assert!(m.html.contains(&format!(
        "<th>k-anonymity (smallest class)</th><td>{k}</td>"
    )));
}

/// The report's TRE section states each researcher's effective guarantee
/// (in report.json and on the page): the weakest rule set among their
/// projects, worked out by the test from the shipped policy's text —
/// one demo researcher per rule set, so each kind appears, and the ρ
/// budget is stated only for the `dp` researcher.
#[test]
fn the_report_states_each_researchers_effective_guarantee() {
    let m = made();
    let expected = expected_guarantees(gpdp::policy::tre::DEFAULT_TRE_POLICY);
    let got: Vec<(String, Vec<String>, String, String)> = m.json["tre"]["researchers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["user"].as_str().unwrap().to_owned(),
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
    assert_eq!(got, expected);
    let codes: Vec<&str> = expected.iter().map(|e| e.2.as_str()).collect();
    assert_eq!(
        codes,
        [
            "deterministic",
            "rho_bounded",
            "cell_key",
            "deterministic",
            "no_project"
        ]
    );
    assert_eq!(expected[1].3, "ρ-bounded (zCDP, ρ budget 2)");
    // On the page: one row per researcher in the section's table.
    let section = &m.html[m
        .html
        .find("effective guarantees</h3>")
        .expect("no section")..];
    let table = &section[..section.find("</table>").unwrap()];
    for (user, _, _, words) in &expected {
        let row = table
            .split("<tr>")
            .find(|r| r.starts_with(&format!("<td>{user}</td>")))
            .unwrap_or_else(|| panic!("no row for {user}"));
        assert!(row.contains(words.as_str()), "{user}: {row}");
    }
}

/// The privacy section shows what an attacker learns, measured against the
/// truth: by default the measurement shipped with gpdp (made under the
/// shipped policy, so no warning), with the padding attack by budget and
/// the reconstruction curves of both rule sets beside guessing; a
/// measurement made under another policy is shown with a warning naming
/// the mismatch, and one of another format is refused, naming the file.
#[test]
fn the_report_shows_the_attacks_measured_and_whether_under_the_policy_in_force() {
    let m = made();
    let shown = &m.json["privacy_attacks"];
    assert_eq!(shown["source"], "shipped");
    assert_eq!(shown["under_policy_in_force"], true);
    let curves = shown["measurement"]["reconstruction"].as_array().unwrap();
    assert!(curves.len() >= 2, "{curves:?}");
    assert!(
        m.html
            .contains("What an attacker learns, measured against the truth")
    );
    assert!(m.html.contains("Reconstruction of a small group"));
    // Both curves, and the table of their crossings.
    assert!(m.html.contains("the cell key method (") && m.html.contains("OpenSAFELY's rules ("));
    assert!(
        m.html.contains("<td>the cell key method</td>")
            && m.html.contains("<td>OpenSAFELY's rules</td>")
    );
    assert!(!m.html.contains("another TRE policy"));

    let file = m.c._dir.path().join("privacy-other.json");
    let out = m.c._dir.path().join("report-other");
    let report_with = |measurement: &serde_json::Value| {
        std::fs::write(&file, measurement.to_string()).unwrap();
        report(&m.c, &out, &["--privacy", file.to_str().unwrap()])
    };
    let mut other: serde_json::Value = shown["measurement"].clone();
    other["tre_policy_rules_sha256"] = serde_json::json!("0".repeat(64));
    let o = report_with(&other);
    assert!(o.status.success(), "{}", stderr(&o));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("another TRE policy"), "no warning");

    other["schema"] = serde_json::json!("something-else/1");
    let o = report_with(&other);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("privacy-other.json"), "{}", stderr(&o));
}
