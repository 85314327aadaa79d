//! `gpdp register`: the public data-uses register.
//!
//! What NHS England's Data Uses Register and OpenSAFELY's public job log do
//! for their platforms, for one store: every project with its purpose,
//! legal basis or exemption, how the National Data Opt-out treats it, its
//! tables, its disclosure rule set and how many researchers it approves;
//! each approved researcher, unnamed, with the projects they reach and
//! their effective guarantee (the weakest rule set among them);
//! per project and month, the queries released, refused and failed, the
//! cells released and withheld and the privacy budget spent; the SQL of
//! every released query with the checksum of its result; the opt-out
//! figures; and the head of the audit log, so that anyone can later check
//! the log still extends it (`gpdp audit --expect-head`). It opens with a
//! plain-English section for patients: what is collected, what is not, and
//! how each opt-out works (the GPDPR condition "patients are informed").
//!
//! Everything comes from the verified audit log, the manifest and the
//! policy. It holds counts, rule names, SQL and checksums — never a
//! pseudonym, a key, the collection key's id, an NHS number or a
//! researcher's name. The one free text a researcher controls, the SQL, is
//! published without its comments and withheld (its checksum still shown)
//! if what is left could carry an identifier: a valid NHS number, a long
//! run mixing letters and digits (a pseudonym, a key, a token), or the
//! store's key id.

pub mod html;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

use crate::policy::tre::TrePolicy;
use crate::store::log::{AuditLog, Head};

#[derive(Debug, Clone, Serialize)]
pub struct Register {
    pub schema: &'static str,
    pub generated_at: String,
    pub store_generation: u64,
    /// The audit log's head when this register was made: publish it, and
    /// check later with `gpdp audit --expect-head`.
    pub log_head: Head,
    pub projects: Vec<ProjectEntry>,
    /// Every researcher approved for a project, in the policy's order,
    /// unnamed.
    pub researchers: Vec<ResearcherEntry>,
    /// Per project and month (`YYYY-MM`, UTC), in that order.
    pub activity: Vec<Activity>,
    pub released_queries: Vec<ReleasedQuery>,
    pub optouts: OptoutFigures,
    /// What leaves a practice, column by column (the collection policy).
    pub collected: Vec<crate::policy::ColumnAction>,
    /// Categories of codes that never leave a practice.
    pub never_collected_codes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProjectEntry {
    pub id: String,
    pub title: String,
    pub purpose: String,
    pub legal_basis: String,
    /// `applies`, or `exempt: <the recorded exemption>`.
    pub national_data_opt_out: String,
    pub tables: Vec<String>,
    pub disclosure: String,
    pub approved_researchers: u64,
}

/// One approved researcher, unnamed (the register names no researcher).
#[derive(Debug, Clone, Serialize)]
pub struct ResearcherEntry {
    pub projects: Vec<String>,
    /// The rule set of each project, in the same order.
    pub rule_sets: Vec<String>,
    /// `rho_bounded`, `cell_key` or `deterministic`: the weakest rule set
    /// they can reach over the same patients.
    pub guarantee: String,
    /// The same, in words: "ρ-bounded (zCDP, ρ budget 2)", "cell key
    /// method: not DP, bounded noise" or "deterministic rules: output
    /// checking needed".
    pub effective_guarantee: String,
    /// Whether the policy records why they may mix `dp` with another rule
    /// set over the same patients (the reason itself is not published).
    pub mixed_rules_reason_recorded: bool,
}

/// One project's activity in one month.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Activity {
    pub project: String,
    pub month: String,
    pub released: u64,
    pub refused: u64,
    /// Queries that failed while running (over time or memory, an error).
    pub failed: u64,
    /// Statistics released (cells of released rows that were not redacted).
    pub cells_released: u64,
    /// Statistics redacted inside released rows.
    pub cells_withheld: u64,
    /// Rows left out because every statistic in them was redacted.
    pub rows_withheld: u64,
    /// Privacy budget (zCDP ρ) charged to `dp` queries.
    pub rho_spent: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReleasedQuery {
    pub time: String,
    pub project: String,
    /// The SQL without comments, or `None` when withheld.
    pub sql: Option<String>,
    /// Why the SQL is not shown, when it is not.
    pub sql_withheld: Option<String>,
    pub rows: u64,
    pub result_sha256: String,
}

/// Opt-out figures: counts only.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OptoutFigures {
    /// Patients whose records never left their practice (Type 1 dissent at collection).
    pub type1_withheld_at_collection: u64,
    /// Patients whose records were deleted after a later Type 1 opt-out.
    pub type1_deleted_later: u64,
    /// Runs of `gpdp optout apply` that deleted records.
    pub deletion_runs: u64,
    /// Of `type1_deleted_later`, patients whose records are erased from the
    /// stored bytes too (`gpdp optout purge`); the others are unreachable,
    /// awaiting the purge.
    pub type1_erased_later: u64,
    /// Runs of `gpdp optout purge` that erased records.
    pub purge_runs: u64,
    /// Request → unreachable, in seconds: median of the last run, longest of all.
    pub unreachable_latency_median_seconds_last_run: Option<f64>,
    pub unreachable_latency_max_seconds: Option<f64>,
    /// Request → erased, in seconds: median of the last purge, longest of all.
    pub erased_latency_median_seconds_last_purge: Option<f64>,
    pub erased_latency_max_seconds: Option<f64>,
    /// Patients on the National Data Opt-out list held for this store.
    pub national_data_opt_out_listed: Option<u64>,
}

/// Builds the register of the store (the chain must verify: a register
/// is not published from a log that does not).
pub fn build(store: &Path, policy: &TrePolicy) -> anyhow::Result<Register> {
    let manifest = crate::store::read_manifest(store)?;
    let verified = AuditLog::at(store).verify().with_context(|| {
        "the audit log does not verify, so no register can be published from it; run `gpdp audit`"
    })?;
    let key_id = manifest.key_id.clone().unwrap_or_default();
    let codes = public_codes(policy);
    let mut released_queries = Vec::new();
    for e in &verified.entries {
        if e["event"] == "query" && e["outcome"] == "released" {
            let (sql, sql_withheld) =
                match publishable_sql(e["sql"].as_str().unwrap_or(""), &key_id, &codes) {
                    Ok(sql) => (Some(sql), None),
                    Err(why) => (None, Some(why)),
                };
            released_queries.push(ReleasedQuery {
                time: e["time"].as_str().unwrap_or("").to_owned(),
                project: e["project"].as_str().unwrap_or("").to_owned(),
                sql,
                sql_withheld,
                rows: e["rows"].as_u64().unwrap_or(0),
                result_sha256: e["result_sha256"].as_str().unwrap_or("").to_owned(),
            });
        }
    }
    let collection = crate::policy::CollectionPolicy::load(None)?;
    let never_collected_codes: std::collections::BTreeSet<String> =
        collection.excluded_codes.values().cloned().collect();
    Ok(Register {
        schema: "gpdp-register/1",
        collected: crate::policy::column_actions(&collection),
        never_collected_codes: never_collected_codes.into_iter().collect(),
        generated_at: crate::store::now_rfc3339(),
        store_generation: manifest.generation,
        log_head: verified.head(),
        projects: projects(policy),
        researchers: researchers(policy),
        activity: activity(&verified.entries),
        released_queries,
        optouts: optout_figures(store, &manifest, &verified.entries)?,
    })
}

fn projects(policy: &TrePolicy) -> Vec<ProjectEntry> {
    policy
        .projects
        .values()
        .map(|p| ProjectEntry {
            id: p.id.clone(),
            title: p.title.clone(),
            purpose: p.purpose.clone(),
            legal_basis: p
                .legal_basis
                .clone()
                .or_else(|| p.exemption.clone())
                .unwrap_or_else(|| "not recorded in the policy".into()),
            national_data_opt_out: if p.ndoo_applies {
                "applies".into()
            } else {
                format!("exempt: {}", p.exemption.clone().unwrap_or_default())
            },
            tables: p.tables.clone(),
            disclosure: p.disclosure.name.to_owned(),
            approved_researchers: policy
                .researchers
                .iter()
                .filter(|r| r.projects.contains(&p.id))
                .count() as u64,
        })
        .collect()
}

/// Each researcher approved for a project, unnamed, with their effective
/// guarantee.
fn researchers(policy: &TrePolicy) -> Vec<ResearcherEntry> {
    policy
        .researchers
        .iter()
        .filter(|r| !r.projects.is_empty())
        .map(|r| {
            let guarantee = policy.effective_guarantee(r);
            ResearcherEntry {
                projects: r.projects.clone(),
                rule_sets: policy.rule_sets_of(r),
                guarantee: guarantee.code().to_owned(),
                effective_guarantee: guarantee.to_string(),
                mixed_rules_reason_recorded: r
                    .mixed_rules_reason
                    .as_ref()
                    .is_some_and(|why| !why.trim().is_empty()),
            }
        })
        .collect()
}

/// Per project and month: queries by outcome, cells released and withheld,
/// ρ charged. Shared with `gpdp report`, which shows the same figures.
pub fn activity(log: &[Value]) -> Vec<Activity> {
    let mut by: BTreeMap<(String, String), Activity> = BTreeMap::new();
    for e in log {
        let event = e["event"].as_str().unwrap_or("");
        if event != "query" && event != "privacy_charge" {
            continue;
        }
        let project = e["project"].as_str().unwrap_or("").to_owned();
        let month = e["time"]
            .as_str()
            .and_then(|t| t.get(..7))
            .unwrap_or("")
            .to_owned();
        let a = by
            .entry((project.clone(), month.clone()))
            .or_insert_with(|| Activity {
                project,
                month,
                ..Activity::default()
            });
        if event == "privacy_charge" {
            a.rho_spent += e["rho"].as_f64().unwrap_or(0.0);
            continue;
        }
        match e["outcome"].as_str() {
            Some("released") => {
                a.released += 1;
                a.cells_released += e["cells_released"].as_u64().unwrap_or(0);
                a.cells_withheld += e["redacted_cells"]
                    .as_u64()
                    .or_else(|| e["suppressed_cells"].as_u64())
                    .unwrap_or(0);
                a.rows_withheld += e["withheld_rows"].as_u64().unwrap_or(0);
            }
            Some("refused") => a.refused += 1,
            Some("failed" | "error") => a.failed += 1,
            _ => {}
        }
    }
    by.into_values()
        .filter(|a| a.released + a.refused + a.failed > 0 || a.rho_spent > 0.0)
        .collect()
}

fn optout_figures(
    store: &Path,
    manifest: &crate::store::Manifest,
    log: &[Value],
) -> anyhow::Result<OptoutFigures> {
    // The same figures as `gpdp report`'s opt-out section, by the same code.
    let later = crate::optout::apply::later_optouts(log);
    Ok(OptoutFigures {
        type1_withheld_at_collection: crate::collect::receipt::read_receipts(store, manifest)?
            .iter()
            .map(|r| r.type1_excluded_patients)
            .sum(),
        type1_deleted_later: later.patients_deleted,
        deletion_runs: later.runs,
        type1_erased_later: later.patients_erased,
        purge_runs: later.purges,
        unreachable_latency_median_seconds_last_run: later.latency_median_seconds_last_run,
        unreachable_latency_max_seconds: later.latency_max_seconds,
        erased_latency_median_seconds_last_purge: later.latency_erased_median_seconds_last_purge,
        erased_latency_max_seconds: later.latency_erased_max_seconds,
        national_data_opt_out_listed: manifest.ndoo.as_ref().map(|n| n.rows),
    })
}

/// The codes of the policy's public codelists: a long number that is one of
/// them is a code, not an identifier.
fn public_codes(policy: &TrePolicy) -> std::collections::BTreeSet<String> {
    policy
        .domains
        .values()
        .flat_map(|d| d.iter().cloned())
        .collect()
}

/// The SQL as the register shows it: comments removed, whitespace as typed.
/// `Err` says why it is withheld instead.
fn publishable_sql(
    sql: &str,
    key_id: &str,
    codes: &std::collections::BTreeSet<String>,
) -> Result<String, String> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer, Whitespace};
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|_| "the SQL could not be tokenized".to_owned())?;
    let mut out = String::new();
    for t in tokens {
        match t {
            Token::Whitespace(Whitespace::SingleLineComment { .. })
            | Token::Whitespace(Whitespace::MultiLineComment(_)) => out.push(' '),
            t => out.push_str(&t.to_string()),
        }
    }
    let out = out.trim().to_owned();
    if !key_id.is_empty()
        && out
            .to_ascii_lowercase()
            .contains(&key_id.to_ascii_lowercase())
    {
        return Err("withheld: it contains the store's key id".into());
    }
    for run in out.split(|c: char| !(c.is_ascii_alphanumeric() || "+/=_-".contains(c))) {
        let letters = run.chars().any(|c| c.is_ascii_alphabetic());
        let digits = run.chars().filter(char::is_ascii_digit).count();
        if run.len() >= 16 && letters && digits > 0 {
            return Err(
                "withheld: it contains a long string of letters and digits (a pseudonym, key or token would look like this)"
                    .into(),
            );
        }
    }
    for digits in digit_groups(&out) {
        if digits.len() == 10
            && crate::nhs_number::NhsNumber::parse(digits.as_bytes()).is_ok()
            && !codes.contains(&digits)
        {
            return Err("withheld: it contains a number that is a valid NHS number".into());
        }
    }
    Ok(out)
}

/// The digits of each run of digits, counting one space or hyphen between
/// digits as part of the run (NHS numbers are often written `943 476 5919`).
fn digit_groups(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut groups = Vec::new();
    let mut current = String::new();
    for (i, &b) in bytes.iter().enumerate() {
        if b.is_ascii_digit() {
            current.push(b as char);
            continue;
        }
        let joins = (b == b' ' || b == b'-')
            && !current.is_empty()
            && bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
        if !joins && !current.is_empty() {
            groups.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_loses_comments_and_is_withheld_when_it_could_carry_an_identifier() {
        let codes = ["1234567881".to_owned()].into_iter().collect();
        let ok = publishable_sql(
            "SELECT sex, count(*) -- 9434765919 was here\nFROM patients /* a0b1c2d3e4f5a6b7c8 */ GROUP BY sex",
            "abcdef0123456789",
            &codes,
        )
        .unwrap();
        assert!(!ok.contains("9434765919") && !ok.contains("a0b1c2"), "{ok}");
        assert!(ok.contains("GROUP BY sex"), "{ok}");
        let withheld = |sql: &str| publishable_sql(sql, "abcdef0123456789", &codes).is_err();
        // A valid NHS number (9434765919 passes the check digit) in a literal.
        assert!(withheld(
            "SELECT count(*) FROM patients WHERE ethnicity = '9434765919'"
        ));
        assert!(withheld(
            "SELECT count(*) FROM patients WHERE ethnicity = '943 476 5919'"
        ));
        assert!(withheld(
            "SELECT count(*) FROM patients WHERE ethnicity = '943-476-5919'"
        ));
        assert!(withheld(
            "SELECT count(*) FROM clinical_events WHERE snomedct_code = 'ab12cd34ef56ab78cd90'"
        ));
        assert!(withheld(
            "SELECT count(*) FROM patients WHERE sex = 'ABCDEF0123456789'"
        ));
        // Public codes and ordinary SQL stay.
        assert!(!withheld(
            "SELECT count(*) FROM medications WHERE dmd_code IN ('12911011000001100', '1234567881')"
        ));
        assert!(!withheld(
            "SELECT age_band, count(DISTINCT patient_id) FROM patients GROUP BY age_band"
        ));
    }

    #[test]
    fn activity_is_per_project_and_month() {
        let log = vec![
            serde_json::json!({"event": "query", "project": "p", "time": "2026-11-30T23:00:00Z", "outcome": "released", "cells_released": 4, "redacted_cells": 1, "withheld_rows": 2}),
            serde_json::json!({"event": "query", "project": "p", "time": "2026-12-01T00:00:00Z", "outcome": "refused"}),
            serde_json::json!({"event": "privacy_charge", "project": "p", "time": "2026-12-01T00:00:01Z", "rho": 0.25}),
            serde_json::json!({"event": "query", "project": "p", "time": "2026-12-01T00:00:02Z", "outcome": "error"}),
            serde_json::json!({"event": "commit", "time": "2026-12-01T00:00:02Z"}),
        ];
        let a = activity(&log);
        assert_eq!(a.len(), 2);
        assert_eq!(
            (
                a[0].month.as_str(),
                a[0].released,
                a[0].cells_released,
                a[0].cells_withheld,
                a[0].rows_withheld
            ),
            ("2026-11", 1, 4, 1, 2)
        );
        assert_eq!(
            (
                a[1].month.as_str(),
                a[1].refused,
                a[1].failed,
                a[1].rho_spent
            ),
            ("2026-12", 1, 1, 0.25)
        );
    }
}
