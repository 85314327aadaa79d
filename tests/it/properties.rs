//! Property tests over collection, in process: whatever names, postcodes,
//! free text and NHS numbers an extract holds, none of them passes into the
//! store, and every row with an invalid NHS number is quarantined.

use std::collections::HashSet;
use std::fmt::Write as _;

use crate::common::*;
use gpdp::collect::{CollectOptions, run};
use gpdp::policy::CollectionPolicy;
use gpdp::progress::Progress;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Patient {
    prefix: u32,
    corrupt: bool,
    given: String,
    family: String,
    postcode: String,
    note: String,
}

fn nhs(prefix: u32, corrupt: bool) -> Option<String> {
    let digits: Vec<u32> = format!("{prefix:09}")
        .chars()
        .map(|c| c.to_digit(10).unwrap())
        .collect();
    let sum: u32 = digits.iter().zip((2..=10).rev()).map(|(d, w)| d * w).sum();
    let check = match 11 - sum % 11 {
        11 => 0,
        10 => return None,
        c => c,
    };
    let check = if corrupt { (check + 1) % 10 } else { check };
    Some(format!("{prefix:09}{check}"))
}

fn patient() -> impl Strategy<Value = Patient> {
    (
        999_000_000u32..999_999_999,
        prop::bool::weighted(0.2),
        "Zq[a-z]{2,8}",
        "Zq[a-z]{2,8}( [A-Z][a-z]{1,6})?",
        prop_oneof![
            Just("QA1 2BD".to_owned()),
            Just("QA1 2BE".to_owned()),
            "Q[A-Z][0-9] [0-9][A-Z]{2}"
        ],
        "[a-z ,.]{5,30}",
    )
        .prop_map(|(prefix, corrupt, given, family, postcode, note)| Patient {
            prefix,
            corrupt,
            given,
            family,
            postcode,
            note,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn no_identifier_passes(patients in prop::collection::vec(patient(), 1..25)) {
        let dir = tempfile::tempdir().unwrap();
        let extract = dir.path().join("extract");
        let practice = extract.join("practices/A81001");
        std::fs::create_dir_all(&practice).unwrap();
        std::fs::create_dir_all(extract.join("reference")).unwrap();
        std::fs::write(extract.join("reference/postcode_lsoa.csv"), "postcode,lsoa_code,imd_decile\nQA1 2BD,E01900001,4\nQA1 2BE,E01900002,7\n").unwrap();

        let mut pts = String::from("nhs_number,given_name,family_name,date_of_birth,sex,postcode,ethnicity,registration_start,registration_end,date_of_death\n");
        let mut events = String::from("nhs_number,date,snomedct_code,numeric_value,free_text\n");
        let mut meds = String::from("nhs_number,date,dmd_code,quantity,free_text\n");
        let mut identifiers = HashSet::new();
        let mut invalid_rows = 0u64;
        for p in &patients {
            let Some(number) = nhs(p.prefix, p.corrupt) else { continue };
            let text = format!("{} {} says {} at {}", p.given, p.family, p.note, p.postcode);
            writeln!(pts, "{number},{},{},1980-07-19,F,{},White,2001-03-04,,", p.given, p.family, p.postcode).unwrap();
            writeln!(events, "{number},2020-05-06,195967001,,\"{text}\"").unwrap();
            writeln!(meds, "{number},2020-05-07,320176004,1,\"{text}\"").unwrap();
            invalid_rows += if p.corrupt { 3 } else { 0 };
            for id in [number, p.given.clone(), p.family.clone(), p.postcode.clone(), text] {
                identifiers.insert(id);
            }
        }
        std::fs::write(practice.join("patients.csv"), pts).unwrap();
        std::fs::write(practice.join("clinical_events.csv"), events).unwrap();
        std::fs::write(practice.join("medications.csv"), meds).unwrap();
        let key = key_file(dir.path(), 3);
        let store = dir.path().join("store");
        let summary = run(
            &CollectOptions {
                extract: extract.clone(),
                store: store.clone(),
                key,
                policy: CollectionPolicy::load(None).unwrap(),
                practices: vec![],
                threads: 1,
                quarantine: None,
                // A first collection with any share of bad rows: the
                // property is about quarantine, not the shrink guards.
                accept_shrink: true,
            },
            &Progress::hidden(),
        ).unwrap();
        let receipt = summary.receipts().next().unwrap();
        prop_assert_eq!(receipt.quarantined.get("invalid_nhs_number").copied().unwrap_or(0), invalid_rows);
        for table in ["patients", "clinical_events", "medications"] {
            for (column, value) in all_values(&read_table(&store, table)) {
                prop_assert!(!identifiers.contains(&value), "{} {} holds an identifier", table, column);
                prop_assert!(!identifiers.iter().any(|i| i.len() > 6 && value.contains(i.as_str())), "{} {} contains an identifier", table, column);
                prop_assert!(value != "1980-07-19", "exact date of birth in {}", column);
            }
        }
    }
}
