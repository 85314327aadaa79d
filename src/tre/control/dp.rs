//! Differential privacy for `dp` projects (docs/design.md §5.4): zero-concentrated
//! DP (zCDP) with the patient as the privacy unit.
//!
//! Before anything runs, [`plan`] fixes what a release costs and how noisy
//! it is, from the release's shape and the policy alone (never from data):
//! - **contribution bounds** — each patient counts in at most `groups`
//!   cells (1 when every group key is a patient attribute, else the rule
//!   set's `max_groups`, never more than the cells there are) and with at
//!   most `max_rows` rows per cell; values are clamped to the column's
//!   `value_bounds`. [`crate::tre::aggregates::bounded`] enforces them in the plan;
//! - **sensitivity** — one patient changes each cell's count by at most
//!   1 (patients) or `max_rows` (rows, values), a sum by at most
//!   `max_rows · max(|lo|, |hi|)` (+1 for rounding the sum to an integer),
//!   in at most `groups` cells: L2 sensitivity `Δ = √groups · bound`;
//! - **noise** — the discrete Gaussian with `σ = Δ / √(2ρ)` is ρ-zCDP
//!   (Canonne, Kamath & Steinke 2020); every statistic costs
//!   `rho_per_statistic` (a sum or mean: half on its sum, half on its
//!   count) and costs add up (zCDP composes by addition);
//! - **public domains** — group keys need a domain in the policy; the
//!   plan keeps only rows inside it and [`control`] releases every cell of
//!   the domains' product, zeros included, so which rows appear reveals
//!   nothing.
//!
//! The **ledger** is the store's hash-chained audit log: [`charge`] adds a
//! `privacy_charge` line for the researcher under the log's lock, before
//! the query runs, and refuses (`budget_exhausted`, nothing charged) when
//! the researcher's spending across all projects on this store would pass
//! their `rho_budget`.
//!
//! Noise is drawn in Rust after the aggregate with OpenDP's exact sampler
//! (`sample_discrete_gaussian`, rational arithmetic, no floating point);
//! its random bits come from `rand`'s thread generator (ChaCha, seeded
//! from the operating system). Thresholds then apply to the noisy counts:
//! disclosure control on top of DP, as post-processing.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::error::ArrowError;
use dashu::rational::RBig;
use datafusion::common::{Column, Result, ScalarValue};
use datafusion::logical_expr::Operator;
use serde_json::{Value, json};

use super::{Controlled, Noise, OperatorOnly, Z95, ordered_and_limited, released_schema};
use crate::policy::tre::{Disclosure, DpParams, TrePolicy};
use crate::store::log::AuditLog;
use crate::tre::checked::{Item, Predicate, Release, Source, SourceNode, StatKind, lineage_of};
use crate::tre::error::Refusal;

/// What a release costs and how it is bounded, fixed before it runs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub params: DpParams,
    /// The most cells of this release one patient counts in.
    pub groups: u32,
    /// Whether the compiled plan must enforce `groups` (a patient could
    /// otherwise reach more cells).
    pub bound_groups: bool,
    /// Each group key's public domain, in key order.
    pub domains: Vec<Vec<String>>,
    /// The number of cells released: the product of the domains' sizes.
    pub cells: usize,
    /// Per statistic, in release order.
    pub statistics: Vec<Noise>,
    /// ρ of the whole release.
    pub rho: f64,
    /// Per statistic: for sums and means, the clamping bounds.
    pub bounds: Vec<Option<Bounds>>,
}

/// The public bounds values are clamped to, and the value a mean's sum
/// is taken around.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub lo: f64,
    pub hi: f64,
    pub centre: f64,
}

/// The noise plan of `release` under `params`, or the rule that refuses it.
pub fn plan(release: &Release, params: &DpParams, policy: &TrePolicy) -> Result<Plan, Refusal> {
    let mut domains = Vec::with_capacity(release.keys.len());
    let mut cells: usize = 1;
    for k in &release.keys {
        let d = policy.domains.get(&k.lineage.column).ok_or_else(|| {
            Refusal::new(
                "no_public_domain",
                format!(
                    "group key {} has no public domain in this TRE's policy ([domains]); under differential privacy every group key needs one",
                    k.lineage.column
                ),
            )
        })?;
        // Only the values the WHERE leaves, where it names them.
        let d: Vec<String> = match where_values(&release.source, &k.column) {
            Some(allowed) => d.iter().filter(|v| allowed.contains(*v)).cloned().collect(),
            None => d.clone(),
        };
        cells = cells.saturating_mul(d.len());
        domains.push(d);
    }
    if cells > policy.max_rows {
        return Err(Refusal::new(
            "too_many_rows",
            format!(
                "these group keys' public domains have {cells} cells, and every cell is released under differential privacy; at most {} rows may be: group by fewer keys",
                policy.max_rows
            ),
        ));
    }
    // A patient is in one cell when every key is one of their own
    // attributes (the patients view); the plan enforces it all the same,
    // because a patient registered twice has two rows there.
    let patient_level = release.keys.iter().all(|k| k.lineage.view == "patients");
    let groups = if patient_level { 1 } else { params.max_groups }
        .min(u32::try_from(cells).unwrap_or(u32::MAX))
        .max(1);
    let bound_groups = patient_level || (groups as usize) < cells;
    let root_groups = f64::from(groups).sqrt();
    let sigma = |bound: f64, rho: f64| {
        // Rounded up a little, so that the float never promises more than ρ.
        root_groups * bound / (2.0 * rho).sqrt() * (1.0 + 1e-9)
    };
    let rho = params.rho_per_statistic;
    let max_rows = f64::from(params.max_rows);
    let mut statistics = Vec::with_capacity(release.statistics.len());
    let mut bounds = Vec::with_capacity(release.statistics.len());
    for s in &release.statistics {
        let column = s
            .column
            .as_ref()
            .map(|c| lineage_of(&release.source, c))
            .transpose()?;
        let (noise, bound) = match s.kind {
            StatKind::Patients => (
                Noise {
                    count_sigma: sigma(1.0, rho),
                    sum_sigma: None,
                    rho,
                },
                None,
            ),
            StatKind::Rows | StatKind::Values => (
                Noise {
                    count_sigma: sigma(max_rows, rho),
                    sum_sigma: None,
                    rho,
                },
                None,
            ),
            StatKind::Sum | StatKind::Mean => {
                let name = column.as_ref().map(|l| l.column.as_str()).unwrap_or("");
                let (lo, hi) = params.bounds_of(name).ok_or_else(|| {
                    Refusal::new(
                        "statistic_not_available",
                        format!(
                            "sums and means of {name} are not released under differential privacy: the policy gives it no value_bounds"
                        ),
                    )
                })?;
                // A mean sums values less the bounds' midpoint (half the
                // sensitivity) and adds it back; a sum sums them as they are.
                let centre = if s.kind == StatKind::Mean {
                    (lo + hi) / 2.0
                } else {
                    0.0
                };
                let reach = (lo - centre).abs().max((hi - centre).abs());
                (
                    Noise {
                        count_sigma: sigma(max_rows, rho / 2.0),
                        // +1: the sum is rounded to an integer before its noise.
                        sum_sigma: Some(sigma(max_rows * reach + 1.0, rho / 2.0)),
                        rho,
                    },
                    Some(Bounds { lo, hi, centre }),
                )
            }
            StatKind::Variance | StatKind::StdDev => {
                return Err(Refusal::new(
                    "statistic_not_available",
                    "variances and standard deviations are not released under differential privacy; ask for sums and counts",
                ));
            }
        };
        bounds.push(bound);
        statistics.push(noise);
    }
    Ok(Plan {
        params: *params,
        groups,
        bound_groups,
        domains,
        cells,
        // No cell, nothing released from the data: nothing to charge.
        rho: if cells == 0 {
            0.0
        } else {
            statistics.iter().map(|n| n.rho).sum()
        },
        statistics,
        bounds,
    })
}

/// The values a group key can still take after the release's WHERE, where
/// it says so: `key = literal` or `key IN (literal, …)` among the
/// conjuncts of the source's outermost filter. The query's text alone
/// decides, never the data, so releasing only these cells of the domain
/// reveals nothing (the others would hold noise around zero).
fn where_values(source: &Source, key: &Column) -> Option<Vec<String>> {
    let SourceNode::Filter { predicate, .. } = &source.node else {
        return None;
    };
    let mut allowed: Option<Vec<String>> = None;
    let mut conjuncts = vec![predicate];
    while let Some(p) = conjuncts.pop() {
        let values: Vec<String> = match p {
            Predicate::And(a, b) => {
                conjuncts.extend([a.as_ref(), b.as_ref()]);
                continue;
            }
            Predicate::Compare {
                column,
                op: Operator::Eq,
                value,
            } if column == key => vec![value.to_string()],
            Predicate::InList {
                column,
                values,
                negated: false,
            } if column == key => values.iter().map(ScalarValue::to_string).collect(),
            _ => continue,
        };
        allowed = Some(match allowed {
            Some(a) => a.into_iter().filter(|v| values.contains(v)).collect(),
            None => values,
        });
    }
    allowed
}

/// ρ as (ε, δ)-DP: ε = ρ + 2√(ρ ln(1/δ)) (Bun & Steinke 2016).
pub fn epsilon(rho: f64, delta: f64) -> f64 {
    rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt()
}

/// A researcher's budget after a charge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ledger {
    pub budget: f64,
    pub charged: f64,
    pub spent: f64,
}

impl Ledger {
    pub fn remaining(&self) -> f64 {
        (self.budget - self.spent).max(0.0)
    }
}

/// What every researcher has spent on a store: the ledger, folded over
/// the audit log's `privacy_charge` lines (and cached beside it).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Spending {
    /// A line could not be read: nothing can be charged (fail closed).
    pub unreadable: bool,
    pub by_user: std::collections::BTreeMap<String, f64>,
    /// The number of charges per user (for the report; a ledger cached
    /// before it was counted reads as none, and charging never needs it).
    #[serde(default)]
    pub charges: std::collections::BTreeMap<String, u64>,
    /// The latest store generation the log records (a ledger cached
    /// before it was kept reads as none, and is folded again).
    #[serde(default)]
    pub generation: Option<u64>,
    /// Released cells charged per user (rule sets with a `cell_budget`).
    #[serde(default)]
    pub cells_by_user: std::collections::BTreeMap<String, u64>,
}

impl Spending {
    pub fn add(&mut self, entry: &Value) {
        if entry.is_null() {
            self.unreadable = true;
            return;
        }
        if let Some(g) = entry.get("generation").and_then(Value::as_u64) {
            self.generation = Some(self.generation.map_or(g, |l| l.max(g)));
        }
        if entry.get("event").and_then(Value::as_str) == Some("cell_charge") {
            match (
                entry.get("user").and_then(Value::as_str),
                entry.get("cells").and_then(Value::as_u64),
            ) {
                (Some(user), Some(cells)) => {
                    *self.cells_by_user.entry(user.to_owned()).or_default() += cells;
                }
                _ => self.unreadable = true,
            }
            return;
        }
        if entry.get("event").and_then(Value::as_str) != Some("privacy_charge") {
            return;
        }
        match (
            entry.get("user").and_then(Value::as_str),
            entry.get("rho").and_then(Value::as_f64),
        ) {
            (Some(user), Some(rho)) => {
                *self.by_user.entry(user.to_owned()).or_default() += rho;
                *self.charges.entry(user.to_owned()).or_default() += 1;
            }
            _ => self.unreadable = true,
        }
    }

    /// ρ `user` has spent; `None` when the ledger cannot be read.
    pub fn of(&self, user: &str) -> Option<f64> {
        (!self.unreadable).then(|| self.by_user.get(user).copied().unwrap_or(0.0))
    }
}

/// What the ledger reads of the log: charges, and the generations commits
/// record (every other line is passed over unread).
const LEDGER_LINES: [&str; 3] = ["\"privacy_charge\"", "\"cell_charge\"", "\"generation\""];

/// The privacy ledger of a population: `DIR/<collection key id>.jsonl`.
///
/// A budget protects people, not a directory. The same extract collected
/// into a second store (the same collection key, so the same pseudonyms:
/// the same population) must not give a researcher a second budget over
/// the same patients — with twelve stores the best membership test went
/// from 84% to 99.97%. So charges go to one ledger per population, named
/// by the collection key's id, in the TRE's ledger directory: `--ledger DIR`
/// (`GPDP_LEDGER`) for a TRE that holds stores in several places, and by
/// default `ledgers/` beside the store, which every store under one
/// directory shares. The ledger is a hash-chained log of the same form as
/// a store's audit log (`gpdp audit --ledger DIR` verifies and replays
/// it); each charge is also copied into the store's own log, for its
/// register and its audit.
pub fn ledger_path(
    store: &std::path::Path,
    dir: Option<&std::path::Path>,
    population: &str,
) -> std::path::PathBuf {
    let dir = match dir {
        Some(d) => d.to_owned(),
        None => std::path::absolute(store)
            .unwrap_or_else(|_| store.to_owned())
            .parent()
            .map_or_else(
                || std::path::PathBuf::from("ledgers"),
                |p| p.join("ledgers"),
            ),
    };
    dir.join(format!("{population}.jsonl"))
}

/// Charges `rho` to `user`'s budget over the population of `store` (its
/// [`ledger_path`]) before a query runs, or refuses with
/// `budget_exhausted` and charges nothing; the charge is copied into the
/// store's own audit log.
///
/// The store's log must agree with the store: when the store in force
/// (`generation`, its manifest's) is not the latest generation its log
/// records, one of them was restored from an older copy, and nothing is
/// charged or run (`no_rollback`, as `gpdp audit` names it).
#[allow(clippy::too_many_arguments)]
pub fn charge(
    store: &std::path::Path,
    ledger: &std::path::Path,
    generation: u64,
    user: &str,
    project: &str,
    budget: f64,
    rho: f64,
    plan_fingerprint: &str,
) -> Result<Result<Ledger, Refusal>, crate::store::log::AuditError> {
    let logged: Spending = AuditLog::at(store).fold(&LEDGER_LINES, Spending::add)?;
    if logged.generation.is_some_and(|g| g != generation) {
        return Ok(Err(Refusal::new(
            "no_rollback",
            format!(
                "the store in force is generation {generation}, but its audit log last recorded generation {}: one of them was restored from an older copy, so the store cannot be trusted and nothing was run or charged; the TRE operator must run `gpdp audit`",
                logged.generation.unwrap_or_default()
            ),
        )));
    }
    if let Some(dir) = ledger.parent() {
        std::fs::create_dir_all(dir).map_err(|source| crate::store::log::AuditError::Io {
            path: dir.to_owned(),
            source,
        })?;
    }
    let mut charged = None;
    let outcome = AuditLog::file(ledger.to_owned()).append_folded(&LEDGER_LINES, Spending::add, |spending| {
        let before = spending.of(user).ok_or_else(|| {
            Refusal::new(
                "budget_exhausted",
                "the privacy ledger cannot be read, so no budget can be charged; the TRE operator must repair it",
            )
        })?;
        if before + rho > budget * (1.0 + 1e-12) {
            return Err(Refusal::new(
                "budget_exhausted",
                format!(
                    "this query costs ρ = {rho:.4}; {user} has spent {before:.4} of a budget of {budget:.4} over these patients (every project and every store of them), {:.4} left; nothing was run or charged",
                    (budget - before).max(0.0)
                ),
            ));
        }
        let line = json!({
            "event": "privacy_charge",
            "time": crate::store::now_rfc3339(),
            "user": user,
            "project": project,
            "rho": rho,
            "spent": before + rho,
            "budget": budget,
            "plan_fingerprint": plan_fingerprint,
        });
        charged = Some((
            Ledger {
                budget,
                charged: rho,
                spent: before + rho,
            },
            line.clone(),
        ));
        Ok(vec![line])
    })?;
    if let Err(refused) = outcome {
        return Ok(Err(refused));
    }
    let (ledger, line) = charged.expect("a charge without a ledger");
    // The store's copy, for its register and audit; if it cannot be
    // written the query fails, charged and not run: fail closed.
    AuditLog::at(store).append(&[line])?;
    Ok(Ok(ledger))
}

/// Charges the `cells` a released answer holds to `user`'s budget of
/// released cells over the population (`ledger`), for a rule set that has
/// one (`cell_budget`): the cell key method's noise is bounded, so a few
/// hundred counts over overlapping subsets of a group reconstruct its
/// members' attributes (measured in `tests/it/differencing.rs`), and nothing
/// but a count of what was released bounds that. Refuses
/// (`query_budget_exhausted`) an answer that would pass the budget —
/// *after* it was computed, since how many cells pass the threshold
/// depends on the data — and then spends the rest of the budget: whether
/// an answer fits is data-dependent, so a refused answer must not be
/// followed by another try (it could be probed, one bit a try, forever).
/// The charge is copied into the store's audit log.
#[allow(clippy::too_many_arguments)]
pub fn charge_cells(
    store: &std::path::Path,
    ledger: &std::path::Path,
    user: &str,
    project: &str,
    budget: u64,
    cells: u64,
    plan_fingerprint: &str,
) -> Result<Result<(), Refusal>, crate::store::log::AuditError> {
    if let Some(dir) = ledger.parent() {
        std::fs::create_dir_all(dir).map_err(|source| crate::store::log::AuditError::Io {
            path: dir.to_owned(),
            source,
        })?;
    }
    let mut decided = None;
    AuditLog::file(ledger.to_owned()).append_folded(&LEDGER_LINES, Spending::add, |spending: &Spending| {
        if spending.unreadable {
            decided = Some((Err(Refusal::new(
                "query_budget_exhausted",
                "the ledger of released cells cannot be read, so nothing can be released; the TRE operator must repair it",
            )), None));
            return Ok::<_, ()>(vec![]);
        }
        let before = spending.cells_by_user.get(user).copied().unwrap_or(0);
        let fits = before + cells <= budget;
        let charged = if fits { cells } else { budget.saturating_sub(before) };
        let line = json!({
            "event": "cell_charge",
            "time": crate::store::now_rfc3339(),
            "user": user,
            "project": project,
            "cells": charged,
            "spent_cells": before + charged,
            "cell_budget": budget,
            "refused": !fits,
            "plan_fingerprint": plan_fingerprint,
        });
        let outcome = if fits {
            Ok(())
        } else {
            Err(Refusal::new(
                "query_budget_exhausted",
                format!(
                    "this answer holds {cells} released cells; {user} had {} of a budget of {budget} released cells left over these patients (every project under this rule set, every store of them), so nothing was released and the budget is now spent",
                    budget.saturating_sub(before)
                ),
            ))
        };
        decided = Some((outcome, Some(line.clone())));
        Ok(if charged > 0 || !fits { vec![line] } else { vec![] })
    })?
    .ok();
    let (outcome, line) = decided.expect("a decision");
    if let Some(line) = line {
        AuditLog::at(store).append(&[line])?;
    }
    Ok(outcome)
}

/// One draw of the discrete Gaussian with scale σ, exactly.
pub fn discrete_gaussian(sigma: f64) -> Result<i64, String> {
    let scale = RBig::try_from(sigma).map_err(|e| format!("σ {sigma}: {e:?}"))?;
    let x = opendp::traits::samplers::sample_discrete_gaussian(scale)
        .map_err(|e| format!("noise sampler: {e}"))?;
    i64::try_from(x).map_err(|e| format!("noise out of range: {e}"))
}

/// The noise a released result carries, for the researcher: per output
/// column σ and the 95% interval's half-width (counts and sums), and the
/// budget.
#[derive(Debug, Clone)]
pub struct Report {
    pub columns: Vec<Option<ColumnNoise>>,
    pub ledger: Ledger,
    pub delta: f64,
    pub groups: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct ColumnNoise {
    pub sigma: f64,
    /// Half-width of the 95% interval around a released count or sum;
    /// `None` for means (a ratio: see `sum_sigma` and `count_sigma`).
    pub ci95: Option<f64>,
    pub count_sigma: f64,
    pub sum_sigma: Option<f64>,
}

impl Report {
    pub fn to_json(&self, names: &[String]) -> Value {
        let noise: Vec<Value> = names
            .iter()
            .zip(&self.columns)
            .filter_map(|(name, c)| {
                c.map(|c| {
                    json!({
                        "column": name,
                        "sigma": c.sigma,
                        "ci95_half_width": c.ci95,
                        "count_sigma": c.count_sigma,
                        "sum_sigma": c.sum_sigma,
                    })
                })
            })
            .collect();
        json!({
            "noise": noise,
            "cells_per_patient": self.groups,
            "rho_charged": self.ledger.charged,
            "rho_spent": self.ledger.spent,
            "rho_budget": self.ledger.budget,
            "rho_remaining": self.ledger.remaining(),
            "delta": self.delta,
            "epsilon_spent": epsilon(self.ledger.spent, self.delta),
        })
    }

    /// The footer line under a table.
    pub fn describe(&self, names: &[String]) -> String {
        let mut parts: Vec<String> = names
            .iter()
            .zip(&self.columns)
            .filter_map(|(name, c)| {
                c.map(|c| match c.ci95 {
                    Some(h) => format!("{name} ±{h:.1} (95%, σ {:.2})", c.sigma),
                    None => format!(
                        "{name}: a noisy sum (σ {:.2}) over a noisy count (σ {:.2}), its 95% interval per row in {name}_ci95_low/high",
                        c.sum_sigma.unwrap_or(0.0),
                        c.count_sigma
                    ),
                })
            })
            .collect();
        parts.push(format!(
            "ρ charged {:.4}, spent {:.4} of {:.4} ({:.4} left; spent = (ε {:.2}, δ {:e}))",
            self.ledger.charged,
            self.ledger.spent,
            self.ledger.budget,
            self.ledger.remaining(),
            epsilon(self.ledger.spent, self.delta),
            self.delta
        ));
        parts.join("; ")
    }
}

/// One released value and, for a mean, its 95% interval.
type Noisy = (f64, Option<(f64, f64)>);

/// Disclosure control under `dp`: every cell of the domains' product,
/// zeros included, each statistic with its noise, then the threshold on
/// the noisy counts. `batches` are the compiled plan's output: the
/// totals of every cell ([`crate::tre::aggregates::bounded::totals`]).
pub fn control(
    release: &Release,
    rules: &Disclosure,
    plan: &Plan,
    batches: &[RecordBatch],
    ledger: Ledger,
) -> Result<(Controlled, Report), ArrowError> {
    let keys = release.keys.len();
    let width = release.statistics.len();
    let (counts, sums) = crate::tre::aggregates::bounded::totals(batches, plan.cells, width)
        .map_err(|e| ArrowError::ComputeError(e.to_string()))?;
    let (schema, kinds) = released_schema(release, Some(&plan.statistics));
    let threshold = rules.redact_at_or_below as i64;
    let mut operator = OperatorOnly {
        // The cells with rows.
        groups: counts
            .chunks(width.max(1))
            .filter(|c| c.iter().any(|&n| n > 0.0))
            .count(),
        ..OperatorOnly::default()
    };
    // Every cell of the product, in order (the last key varies fastest).
    let mut key_text: Vec<Vec<&str>> = vec![Vec::with_capacity(plan.cells); keys];
    let mut values: Vec<Vec<Option<Noisy>>> =
        vec![Vec::with_capacity(plan.cells); release.statistics.len()];
    let noise_err = |e: String| ArrowError::ComputeError(e);
    for index in 0..plan.cells {
        let mut rest = index;
        let mut cell = vec![""; keys];
        for k in (0..keys).rev() {
            let d = &plan.domains[k];
            cell[k] = d[rest % d.len()].as_str();
            rest /= d.len();
        }
        for (k, v) in cell.into_iter().enumerate() {
            key_text[k].push(v);
        }
        for (s, (stat, noise)) in release.statistics.iter().zip(&plan.statistics).enumerate() {
            let (count, sum) = (counts[index * width + s] as i64, sums[index * width + s]);
            let noisy_count = count + discrete_gaussian(noise.count_sigma).map_err(noise_err)?;
            // The released value, and for a mean its 95% interval.
            let value = if noisy_count <= threshold {
                *operator.redacted_by_reason.entry("threshold").or_default() += 1;
                None
            } else {
                match (stat.kind, noise.sum_sigma, plan.bounds[s]) {
                    (StatKind::Sum | StatKind::Mean, Some(sigma), Some(b)) => {
                        let noisy_sum = (sum.round() as i64
                            + discrete_gaussian(sigma).map_err(noise_err)?)
                            as f64;
                        if stat.kind == StatKind::Mean {
                            let c = noisy_count as f64;
                            let offset = noisy_sum / c;
                            // The delta method: Var(S/C) ≈ (σ_S² + (S/C)² σ_C²) / C².
                            let half = Z95
                                * (sigma.powi(2) + offset.powi(2) * noise.count_sigma.powi(2))
                                    .sqrt()
                                / c;
                            // The mean of clamped values lies within the
                            // bounds, so the released one does too.
                            let at = |x: f64| x.clamp(b.lo, b.hi);
                            let mean = b.centre + offset;
                            Some((at(mean), Some((at(mean - half), at(mean + half)))))
                        } else {
                            Some((noisy_sum, None))
                        }
                    }
                    _ => Some((noisy_count as f64, None)),
                }
            };
            values[s].push(value);
        }
    }
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(release.outputs.len());
    let mut column_of = Vec::with_capacity(release.outputs.len());
    let mut noise_columns = Vec::with_capacity(release.outputs.len());
    for o in &release.outputs {
        column_of.push(columns.len());
        match o.item {
            Item::Key(k) => {
                let text: ArrayRef = Arc::new(StringArray::from(key_text[k].clone()));
                let field = schema.field(columns.len());
                columns.push(arrow::compute::cast(&text, field.data_type())?);
                noise_columns.push(None);
            }
            Item::Statistic(s) => {
                let v = &values[s];
                let kind = release.statistics[s].kind;
                let column: ArrayRef = if kind.is_count() {
                    Arc::new(Int64Array::from_iter(
                        v.iter().map(|x| x.map(|x| x.0 as i64)),
                    ))
                } else {
                    Arc::new(Float64Array::from_iter(v.iter().map(|x| x.map(|x| x.0))))
                };
                columns.push(column);
                let n = plan.statistics[s];
                let sigma = n.released_sigma(kind);
                noise_columns.push(Some(ColumnNoise {
                    sigma,
                    ci95: (kind != StatKind::Mean).then_some(Z95 * sigma),
                    count_sigma: n.count_sigma,
                    sum_sigma: n.sum_sigma,
                }));
                if kind == StatKind::Mean {
                    let interval = |end: fn((f64, f64)) -> f64| -> ArrayRef {
                        Arc::new(Float64Array::from_iter(
                            v.iter().map(|x| x.and_then(|x| x.1).map(end)),
                        ))
                    };
                    columns.push(interval(|i| i.0));
                    columns.push(interval(|i| i.1));
                    noise_columns.extend([None, None]);
                }
            }
        }
    }
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let (batch, redacted_cells) = ordered_and_limited(&batch, release, &column_of, &kinds)?;
    Ok((
        Controlled {
            batch,
            kinds,
            redacted_cells,
            operator,
        },
        Report {
            columns: noise_columns,
            ledger,
            delta: plan.params.delta,
            groups: plan.groups,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discrete_gaussian_draws_have_the_asked_spread() {
        let sigma = 5.0;
        let n = 20_000;
        let draws: Vec<i64> = (0..n).map(|_| discrete_gaussian(sigma).unwrap()).collect();
        let mean = draws.iter().sum::<i64>() as f64 / n as f64;
        let var = draws
            .iter()
            .map(|x| (*x as f64 - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        // Standard errors: mean 5/√20000 ≈ 0.035; variance ≈ 25·√(2/20000) ≈ 0.25.
        assert!(mean.abs() < 0.2, "mean {mean}");
        assert!((var - 25.0).abs() < 1.5, "variance {var}");
        // The stated 95% interval covers what the discrete Gaussian's own
        // mass inside it says (≈ 0.943 at σ = 5: integers up to ±9), within
        // 4.5 standard errors (≈ 0.0074), so the test does not flake.
        let inside = draws
            .iter()
            .filter(|x| (**x as f64).abs() <= Z95 * sigma)
            .count() as f64
            / n as f64;
        let mass = |k: i64| (-((k * k) as f64) / (2.0 * sigma * sigma)).exp();
        let total: f64 = (-100..=100).map(mass).sum();
        let expected = (-100..=100)
            .filter(|k| (*k as f64).abs() <= Z95 * sigma)
            .map(mass)
            .sum::<f64>()
            / total;
        let se = (expected * (1.0 - expected) / n as f64).sqrt();
        assert!(
            (inside - expected).abs() < 4.5 * se,
            "{inside} inside, {expected} expected"
        );
        assert!(expected > 0.94, "{expected}");
    }

    #[test]
    fn rho_converts_to_epsilon_delta() {
        // ρ = 1, δ = 1e-6: ε = 1 + 2√(ln 10⁶) ≈ 8.43.
        assert!((epsilon(1.0, 1e-6) - 8.4338).abs() < 1e-3);
        assert!(epsilon(0.01, 1e-6) < epsilon(0.02, 1e-6));
    }

    #[test]
    fn spending_counts_only_the_users_charges_and_fails_closed() {
        let mut s = Spending::default();
        for e in [
            json!({"event": "privacy_charge", "user": "alice", "rho": 0.25}),
            json!({"event": "query", "user": "alice", "rho": 5.0}),
            json!({"event": "privacy_charge", "user": "carol", "rho": 1.0}),
            json!({"event": "privacy_charge", "user": "alice", "rho": 0.5}),
        ] {
            s.add(&e);
        }
        assert_eq!(s.of("alice"), Some(0.75));
        assert_eq!(s.of("dave"), Some(0.0));
        s.add(&Value::Null);
        assert_eq!(s.of("alice"), None);
    }

    #[test]
    fn charges_stop_at_the_budget_and_refusals_cost_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let store = store.as_path();
        let ledger = ledger_path(store, None, "k1");
        assert_eq!(ledger, dir.path().join("ledgers/k1.jsonl"));
        let charge = |user, rho| charge(store, &ledger, 0, user, "p", 1.0, rho, "f").unwrap();
        for _ in 0..4 {
            charge("alice", 0.25).unwrap();
        }
        assert_eq!(charge("alice", 0.25).unwrap_err().rule, "budget_exhausted");
        // Another researcher's budget is their own.
        assert_eq!(charge("bob", 0.5).unwrap().spent, 0.5);
        // The ledger holds the charges; the store's log a copy of each.
        let book = AuditLog::file(ledger.clone()).verify().unwrap();
        assert_eq!(book.lines, 5);
        let log = AuditLog::at(store).verify().unwrap();
        assert_eq!(log.entries, book.entries);
        let mut s = Spending::default();
        book.entries.iter().for_each(|e| s.add(e));
        assert_eq!(s.of("alice"), Some(1.0));
        // Other lines in the ledger are folded in.
        AuditLog::file(ledger.clone())
            .append(&[json!({"event": "privacy_charge", "user": "bob", "rho": 0.25})])
            .unwrap();
        assert_eq!(charge("bob", 0.25).unwrap().spent, 1.0);
        // Nothing beside the log can reset the ledger: a cache file such as
        // an earlier version kept, claiming alice has spent nothing, is not
        // read (it once was, and her spend went back to 0).
        std::fs::write(
            store.join("audit/privacy-ledger.json"),
            r#"{"offset":0,"hash":"0","state":{"unreadable":false,"by_user":{"alice":0.0}}}"#,
        )
        .unwrap();
        assert_eq!(charge("alice", 0.25).unwrap_err().rule, "budget_exhausted");
        // A second store of the same population shares the spend; another
        // population has its own.
        let twin = dir.path().join("twin");
        let twin_ledger = ledger_path(&twin, None, "k1");
        assert_eq!(twin_ledger, ledger);
        let other = ledger_path(&twin, None, "k2");
        assert_eq!(
            super::charge(&twin, &twin_ledger, 0, "alice", "p", 1.0, 0.25, "f")
                .unwrap()
                .unwrap_err()
                .rule,
            "budget_exhausted"
        );
        assert!(
            super::charge(&twin, &other, 0, "alice", "p", 1.0, 0.25, "f")
                .unwrap()
                .is_ok()
        );
        // An unreadable line refuses every charge.
        let text = std::fs::read_to_string(&ledger).unwrap();
        std::fs::write(
            &ledger,
            text.replacen("privacy_charge", "privacy_charg\"", 1),
        )
        .unwrap();
        assert!(
            charge("carol", 0.25)
                .unwrap_err()
                .reason
                .contains("cannot be read")
        );
    }

    #[test]
    fn a_store_or_log_restored_from_an_older_copy_is_charged_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path();
        let ledger = dir.path().join("ledger.jsonl");
        let charge = |store, generation, user, project, budget, rho, fp| {
            super::charge(store, &ledger, generation, user, project, budget, rho, fp)
        };
        let log = AuditLog::at(store);
        log.append(&[json!({"event": "commit", "generation": 1})])
            .unwrap();
        charge(store, 1, "alice", "p", 1.0, 0.25, "f")
            .unwrap()
            .unwrap();
        log.append(&[json!({"event": "commit", "generation": 2})])
            .unwrap();
        // The store in force is older than the log (a restored store), or
        // newer (a restored log, which would have forgotten charges).
        for generation in [1, 3] {
            let refused = charge(store, generation, "alice", "p", 1.0, 0.25, "f")
                .unwrap()
                .unwrap_err();
            assert_eq!(refused.rule, "no_rollback");
        }
        let lines = log.verify().unwrap().lines;
        let charged = charge(store, 2, "alice", "p", 1.0, 0.25, "f")
            .unwrap()
            .unwrap();
        assert_eq!(charged.spent, 0.5, "refusals charged nothing");
        assert_eq!(log.verify().unwrap().lines, lines + 1);
    }
}
