//! What an attacker learns through the boundary, measured against the
//! truth: the report's evidence that the rule sets protect what they claim,
//! and where they stop.
//!
//! The attacks need a store of their own (hundreds of queries, each a line
//! of the store's audit log), so the report does not run them on the store
//! it describes: `gpdp bench --privacy-only --out DIR` measures them on a
//! small synthetic store of its own and writes `DIR/privacy.json`, and the
//! report shows such a file — the one given with `--privacy FILE`, else the
//! measurement shipped in the repository (`docs/measurements/privacy.json`,
//! written by that command). Each measurement records the SHA-256 of the
//! rules of the TRE policy it was made under (comments and layout aside); the report says whether that is the policy
//! in force, so a changed policy cannot borrow an old measurement's
//! figures unnoticed.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The measurement shipped with gpdp, made by `gpdp bench --privacy-only`
/// under the shipped TRE policy.
pub const SHIPPED: &str = include_str!("../../docs/measurements/privacy.json");

/// The format of `privacy.json`.
pub const SCHEMA: &str = "gpdp-privacy-measurement/1";

/// One run of the privacy attacks against the truth.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Measurement {
    pub schema: String,
    /// When the attacks ran (RFC 3339, UTC).
    pub measured_at: String,
    /// The machine they ran on, in words (cores, operating system).
    pub machine: String,
    pub gpdp_version: String,
    /// SHA-256 of the rules of the TRE policy the attacks' rule sets came
    /// from (its TOML without comments or layout: `TrePolicy::rules_sha256`).
    pub tre_policy_rules_sha256: String,
    /// Patients of the synthetic store attacked.
    pub patients: u64,
    /// The padding attack on one person, by rule set and budget.
    pub by_budget: Vec<BudgetAttack>,
    /// Reconstruction of a small group's attribute, by number of counts.
    pub reconstruction: Vec<Curve>,
}

/// The padding attack's outcome under one rule set and budget.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BudgetAttack {
    pub rule_set: String,
    pub questions_per_target: usize,
    /// ρ spent on each target (differential privacy only).
    pub rho_per_target: Option<f64>,
    pub targets: usize,
    pub right: usize,
    pub accuracy: f64,
    /// Guessing the majority answer for every target.
    pub chance: f64,
    /// Under `dp`: the accuracy theory predicts at this ρ.
    pub theory: Option<f64>,
}

impl BudgetAttack {
    /// The attack in a few words, for a chart's axis.
    pub fn label(&self) -> String {
        match self.rho_per_target {
            Some(rho) => format!("dp, ρ {rho} each"),
            None => format!("{}, {} asks", self.rule_set, self.questions_per_target),
        }
    }
}

/// A reconstruction's accuracy after each number of counts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Curve {
    pub rule_set: String,
    pub members: usize,
    /// Guessing the majority answer for every member.
    pub base_rate: f64,
    /// (counts asked, share of members right).
    pub points: Vec<(usize, f64)>,
    /// The rule that stopped the attack early, if one did.
    pub stopped_by: Option<String>,
    /// Attacks averaged (each over other random subsets of the group).
    pub runs: usize,
}

impl Curve {
    /// The fewest counts after which the accuracy stays above the base rate.
    pub fn passes_base_rate(&self) -> Option<usize> {
        let last_below = self.points.iter().rposition(|p| p.1 <= self.base_rate);
        self.points
            .get(last_below.map_or(0, |i| i + 1))
            .map(|p| p.0)
    }
}

/// A measurement as the report shows it: where it came from, and whether
/// it was made under the policy in force.
#[derive(Debug, Clone, Serialize)]
pub struct Shown {
    /// `shipped` or the file given.
    pub source: String,
    pub measurement: Measurement,
    pub policy_in_force_sha256: String,
    pub under_policy_in_force: bool,
}

/// Reads a measurement, refusing one of another format.
pub fn parse(text: &str) -> anyhow::Result<Measurement> {
    let m: Measurement = serde_json::from_str(text)?;
    anyhow::ensure!(
        m.schema == SCHEMA,
        "a privacy measurement of format {:?}, not {SCHEMA:?}",
        m.schema
    );
    Ok(m)
}

/// The measurement to show beside a report made under the policy whose
/// rules' SHA-256 is `policy_sha256`: the file `given`, else the shipped one.
pub fn shown(given: Option<&Path>, policy_sha256: &str) -> anyhow::Result<Shown> {
    let (source, measurement) = match given {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let m = parse(&text).with_context(|| format!("reading {}", path.display()))?;
            (path.display().to_string(), m)
        }
        None => (
            "shipped".to_owned(),
            parse(SHIPPED).context("the shipped privacy measurement")?,
        ),
    };
    Ok(Shown {
        source,
        under_policy_in_force: measurement.tre_policy_rules_sha256 == policy_sha256,
        policy_in_force_sha256: policy_sha256.to_owned(),
        measurement,
    })
}

/// The report's section: the padding attack by budget and the
/// reconstruction curves, each beside what guessing gets.
pub fn render(shown: &Shown) -> anyhow::Result<String> {
    use crate::page::{bar_chart, esc, line_chart};
    let m = &shown.measurement;
    let mut h = String::from("<h3>What an attacker learns, measured against the truth</h3>");
    h += &format!(
        "<p class=\"note\">Measured by <code>gpdp bench --privacy-only</code> on a synthetic store of {} patients of its own, {} on {} (gpdp {}; source: {}).</p>",
        m.patients,
        esc(&m.measured_at),
        esc(&m.machine),
        esc(&m.gpdp_version),
        esc(&shown.source)
    );
    if !shown.under_policy_in_force {
        h += &format!(
            "<p class=\"verdict bad\">This measurement was made under another TRE policy (SHA-256 {}…, in force {}…): its figures may not hold for the rules in force. Measure again with <code>gpdp bench --privacy-only --out DIR</code> and pass <code>--privacy DIR/privacy.json</code>.</p>",
            esc(m.tre_policy_rules_sha256.get(..12).unwrap_or_default()),
            esc(shown.policy_in_force_sha256.get(..12).unwrap_or_default()),
        );
    }
    if !m.by_budget.is_empty() {
        let labels: Vec<String> = m.by_budget.iter().map(BudgetAttack::label).collect();
        let values: Vec<f64> = m.by_budget.iter().map(|a| 100.0 * a.accuracy).collect();
        h += &bar_chart(
            "Padding attack on one person: targets read right, by rule set and budget (line: guessing)",
            &labels,
            &values,
            "% of targets right",
            m.by_budget.first().map(|a| 100.0 * a.chance),
        );
    }
    if !m.reconstruction.is_empty() {
        let series: Vec<(String, Vec<(f64, f64)>)> = m
            .reconstruction
            .iter()
            .map(|c| {
                (
                    format!("{} ({} members)", rule_set_name(&c.rule_set), c.members),
                    c.points
                        .iter()
                        .map(|&(q, a)| (q as f64, 100.0 * a))
                        .collect(),
                )
            })
            .collect();
        let mut references: Vec<(String, f64)> = Vec::new();
        for c in &m.reconstruction {
            let y = 100.0 * c.base_rate;
            if !references.iter().any(|r| (r.1 - y).abs() < 1e-9) {
                references.push((format!("guessing ({:.1}%)", y), y));
            }
        }
        let low = references
            .iter()
            .map(|r| r.1)
            .chain(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)))
            .fold(100.0f64, f64::min);
        h += &line_chart(
            "Reconstruction of a small group's diabetes codes, by counts asked",
            &series,
            &references,
            ("counts asked", "% of members right"),
            (low - 10.0).clamp(0.0, 90.0).floor()..100.5,
        );
        h += "<table><tr><th>rule set</th><th>members</th><th>attacks averaged</th><th>guessing</th><th>above guessing from</th><th>right after the last count</th></tr>";
        for c in &m.reconstruction {
            let last = c.points.last().map_or(0.0, |p| p.1);
            h += &format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1}%</td><td>{}</td><td>{:.1}%{}</td></tr>",
                esc(rule_set_name(&c.rule_set)),
                c.members,
                c.runs,
                100.0 * c.base_rate,
                c.passes_base_rate()
                    .map_or("never".to_owned(), |q| format!("{q} counts")),
                100.0 * last,
                c.stopped_by.as_deref().map_or(String::new(), |r| format!(
                    " (stopped by <code>{}</code>)",
                    esc(r)
                ))
            );
        }
        h += "</table><p class=\"note\">Each point is the mean accuracy of the attacks averaged. Each count is a released <code>count(DISTINCT patient_id)</code> over a random half of the group, padded so nothing is redacted; a least-squares fit decodes each member. The cell key method's noise is bounded, and OpenSAFELY's rounding is deterministic: neither stops many counts, which is why the cell key method has a budget of released cells per researcher and population (<code>cell_budget</code>), set below where these curves pass guessing, and why threshold rules need human output checking. Only differential privacy (<code>dp</code>) bounds what any sequence of queries reveals.</p>";
    }
    Ok(h)
}

fn rule_set_name(rule_set: &str) -> &str {
    match rule_set {
        "ckm" => "the cell key method",
        "opensafely" => "OpenSAFELY's rules",
        "acro" => "ACRO's rules",
        "dp" => "differential privacy",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_measurement_reads_and_has_both_attacks() {
        let m = parse(SHIPPED).unwrap();
        assert!(!m.by_budget.is_empty(), "the padding attack by budget");
        assert!(
            m.reconstruction.iter().any(|c| c.rule_set == "ckm")
                && m.reconstruction.iter().any(|c| c.rule_set == "opensafely"),
            "reconstruction under the cell key method and OpenSAFELY's rules"
        );
        for c in &m.reconstruction {
            assert!(c.points.windows(2).all(|w| w[0].0 < w[1].0), "{c:?}");
            assert!(c.points.iter().all(|p| (0.0..=1.0).contains(&p.1)));
        }
    }

    #[test]
    fn the_shipped_measurement_was_made_under_the_shipped_policy() {
        let policy = crate::policy::tre::TrePolicy::load(None).unwrap();
        let shown = shown(None, &policy.rules_sha256).unwrap();
        assert!(
            shown.under_policy_in_force,
            "the rules of policies/tre.toml (now {}) changed since docs/measurements/privacy.json \
             was measured: run `gpdp bench --privacy-only --out DIR` (release) and copy its privacy.json",
            policy.rules_sha256
        );
    }

    /// The cell key method's budget of released cells stays below the
    /// number of counts at which the shipped measurement's reconstruction
    /// passes guessing (the policy's comment says why).
    #[test]
    fn the_cell_budget_is_below_where_reconstruction_passes_guessing() {
        let policy = crate::policy::tre::TrePolicy::load(None).unwrap();
        let budget = policy
            .projects
            .values()
            .filter_map(|p| p.disclosure.cell_budget)
            .max()
            .expect("a ckm project with a cell budget");
        let m = parse(SHIPPED).unwrap();
        let ckm = m
            .reconstruction
            .iter()
            .find(|c| c.rule_set == "ckm")
            .unwrap();
        let crossing = ckm.passes_base_rate().expect("measured past its crossing");
        assert!(
            (budget as usize) < crossing,
            "cell_budget {budget} is not below the measured crossing at {crossing} counts"
        );
    }

    #[test]
    fn a_measurement_of_another_format_is_refused() {
        let other = SHIPPED.replacen(SCHEMA, "gpdp-privacy-measurement/0", 1);
        assert!(parse(&other).is_err());
    }

    #[test]
    fn passing_the_base_rate_means_staying_above_it() {
        let c = Curve {
            rule_set: "ckm".into(),
            members: 10,
            base_rate: 0.7,
            points: vec![(10, 0.8), (25, 0.6), (50, 0.9), (100, 1.0)],
            stopped_by: None,
            runs: 1,
        };
        assert_eq!(c.passes_base_rate(), Some(50));
        let never = Curve {
            points: vec![(10, 0.5)],
            ..c
        };
        assert_eq!(never.passes_base_rate(), None);
    }
}
