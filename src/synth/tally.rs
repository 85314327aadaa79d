//! Counts the generator keeps while writing, summed over practices into
//! `truth/summary.json`. Every figure is counted from the rows actually
//! written, so tests can check the summary against the files.

use serde_json::{Value, json};

use super::codelists::{Condition, SENSITIVE_CATEGORIES};

pub const TABLES: [&str; 3] = ["patients", "clinical_events", "medications"];
pub const BAD_REASONS: [&str; 4] = [
    "invalid_nhs_number",
    "missing_nhs_number",
    "malformed_date",
    "wrong_column_count",
];

#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub persons: u64,
    pub adults: u64,
    pub registrations: u64,
    pub registered_at_extract: u64,
    pub movers: u64,
    pub deaths: u64,
    pub deregistered: u64,
    pub ndoo_persons: u64,
    pub rows: [u64; 3],
    pub bytes: u64,
    pub bad_by_table: [u64; 3],
    pub bad_by_reason: [u64; 4],
    pub type1_persons_with_codes: u64,
    pub type1_opted_out_persons: u64,
    pub type1_opted_out_registrations: u64,
    /// Indexed by `Type1Pattern as usize`.
    pub type1_patterns: [u64; 6],
    pub conditions: [u64; 7],
    pub sensitive_events: [u64; 5],
    pub free_text_rows: [u64; 2],
    pub expected_patients_out: u64,
    pub expected_rows_out: [u64; 3],
    /// Hospital spells and death registrations (`linked/`).
    pub linked: super::linked::LinkedTally,
}

fn add<const N: usize>(a: &mut [u64; N], b: &[u64; N]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

impl Tally {
    pub fn merge(&mut self, o: &Tally) {
        self.persons += o.persons;
        self.adults += o.adults;
        self.registrations += o.registrations;
        self.registered_at_extract += o.registered_at_extract;
        self.movers += o.movers;
        self.deaths += o.deaths;
        self.deregistered += o.deregistered;
        self.ndoo_persons += o.ndoo_persons;
        add(&mut self.rows, &o.rows);
        self.bytes += o.bytes;
        add(&mut self.bad_by_table, &o.bad_by_table);
        add(&mut self.bad_by_reason, &o.bad_by_reason);
        self.type1_persons_with_codes += o.type1_persons_with_codes;
        self.type1_opted_out_persons += o.type1_opted_out_persons;
        self.type1_opted_out_registrations += o.type1_opted_out_registrations;
        add(&mut self.type1_patterns, &o.type1_patterns);
        add(&mut self.conditions, &o.conditions);
        add(&mut self.sensitive_events, &o.sensitive_events);
        add(&mut self.free_text_rows, &o.free_text_rows);
        self.expected_patients_out += o.expected_patients_out;
        add(&mut self.expected_rows_out, &o.expected_rows_out);
        self.linked.merge(&o.linked);
    }

    pub fn total_rows(&self) -> u64 {
        self.rows.iter().sum()
    }

    /// The counts as they appear in `truth/summary.json`.
    pub fn to_json(&self) -> Value {
        let per_table = |a: &[u64; 3]| -> Value {
            TABLES
                .iter()
                .zip(a)
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect()
        };
        let share = |n: u64, of: u64| {
            if of == 0 {
                0.0
            } else {
                (n as f64 / of as f64 * 10_000.0).round() / 10_000.0
            }
        };
        json!({
            "persons": self.persons,
            "adults": self.adults,
            "registrations": self.registrations,
            "registered_at_extract": self.registered_at_extract,
            "movers": self.movers,
            "deaths": self.deaths,
            "deregistered": self.deregistered,
            "rows": per_table(&self.rows),
            "bad_rows": {
                "total": self.bad_by_table.iter().sum::<u64>(),
                "by_table": per_table(&self.bad_by_table),
                "by_reason": BAD_REASONS.iter().zip(&self.bad_by_reason).map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            },
            "type1": {
                "persons_with_codes": self.type1_persons_with_codes,
                "opted_out_persons": self.type1_opted_out_persons,
                "opted_out_share": share(self.type1_opted_out_persons, self.persons),
                "opted_out_registrations": self.type1_opted_out_registrations,
                "patterns": {
                    "dissent": self.type1_patterns[1],
                    "withdrew": self.type1_patterns[2],
                    "redissented": self.type1_patterns[3],
                    "same_day_tie": self.type1_patterns[4],
                    "previous_practice_only": self.type1_patterns[5],
                },
            },
            "ndoo": {
                "persons": self.ndoo_persons,
                "share": share(self.ndoo_persons, self.persons),
            },
            "conditions": Condition::ALL.iter().map(|c| (c.key().to_string(), json!({
                "persons": self.conditions[*c as usize],
                "share_of_adults": share(self.conditions[*c as usize], self.adults),
            }))).collect::<serde_json::Map<_, _>>(),
            "sensitive_events": SENSITIVE_CATEGORIES.iter().zip(&self.sensitive_events).map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "free_text_rows": {"clinical_events": self.free_text_rows[0], "medications": self.free_text_rows[1]},
            "linked": self.linked.to_json(),
            "expected_collection": {
                "note": "good rows of registrations whose practice record has no Type 1 dissent at the extract date; sensitive-code exclusion by policy is not applied here",
                "patients_out": self.expected_patients_out,
                "type1_excluded_registrations": self.type1_opted_out_registrations,
                "rows_out": per_table(&self.expected_rows_out),
            },
        })
    }
}
