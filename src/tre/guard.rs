//! Safe outputs, before anything runs: the plan guard.
//!
//! It reads the researcher's logical plan as planned from their SQL — the
//! same plan that will run, on every path (EXPLAIN and DESCRIBE are refused
//! outright, because DataFusion turns analyzer errors into EXPLAIN output) —
//! and accepts only plans whose result is an aggregate over patient data:
//!
//! - every table is one of the project's views (no raw tables, no table
//!   functions, no VALUES-only queries);
//! - the released result is an `Aggregate`, reached from the root through
//!   projections, filters (HAVING), sorts, limits, aliases or UNIONs of such;
//! - its group keys are plain columns on the project's allow-list (never a
//!   pseudonym, a date, a small area or an expression over them);
//! - no window functions, and only aggregates that cannot reveal a single
//!   row's value (count, sum, avg, stddev, variance) — not array_agg,
//!   string_agg, first/last/nth_value, min, max, median or percentiles;
//! - joins only on `patient_id` equality.
//!
//! An accepted plan is then rewritten so that every released row carries the
//! number of distinct patients behind it, for disclosure control (counted up
//! to what the threshold needs: see [`super::patients`]). Every refusal names
//! its rule.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::common::Column;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{
    Aggregate, Expr, LogicalPlan, LogicalPlanBuilder, Projection, SubqueryAlias,
};

use super::Refusal;
use super::dominance::dominance;
use super::patients::patients_at_least;
use super::sdc::ColumnKind;
use crate::policy::tre::Project;

/// Hidden columns, added by the guard and removed before release, start with this.
pub const HIDDEN: &str = "__gpdp_";
/// The hidden column that carries each row's distinct-patient count (capped
/// at the disclosure threshold + 1).
pub const PATIENTS: &str = "__gpdp_patients";
/// The hidden column that carries the dominance rules a row's sums and
/// averages break (rule sets with dominance checks only).
pub const DOMINANCE: &str = "__gpdp_dominance";

const ALLOWED_AGGREGATES: [&str; 10] = [
    "count",
    "sum",
    "avg",
    "mean",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "var",
    "var_pop",
    "var_samp",
];
const ROW_REVEALING: [&str; 14] = [
    "array_agg",
    "string_agg",
    "first_value",
    "last_value",
    "nth_value",
    "min",
    "max",
    "median",
    "approx_median",
    "percentile_cont",
    "approx_percentile_cont",
    "approx_percentile_cont_with_weight",
    "mode",
    "listagg",
];

/// An accepted plan, rewritten to carry patient counts, and what each
/// visible output column is.
pub struct Checked {
    pub plan: LogicalPlan,
    pub kinds: Vec<ColumnKind>,
}

/// Refuses anything that is not a plain query (checked before the walk).
pub fn check_statement_kind(plan: &LogicalPlan) -> Result<(), Refusal> {
    match plan {
        LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => Err(Refusal::new(
            "explain_not_allowed",
            "EXPLAIN is not available in the TRE (plans can reveal what queries could not)",
        )),
        LogicalPlan::DescribeTable(_) => Err(Refusal::new(
            "describe_not_allowed",
            "DESCRIBE is not available; the views are documented in the README",
        )),
        LogicalPlan::Statement(_)
        | LogicalPlan::Dml(_)
        | LogicalPlan::Ddl(_)
        | LogicalPlan::Copy(_) => Err(Refusal::new(
            "statement_not_allowed",
            "only SELECT queries are allowed (no DDL, DML or statements)",
        )),
        _ => Ok(()),
    }
}

/// Walks the whole plan, subqueries included, skipping the trusted view
/// subtrees; returns how many view scans it saw.
fn walk(
    plan: &LogicalPlan,
    views: &HashMap<String, LogicalPlan>,
    project: &Project,
) -> Result<usize, Refusal> {
    let mut seen = 0usize;
    let mut refusal: Option<Refusal> = None;
    let is_view = |p: &LogicalPlan| views.values().any(|v| v == p);
    let _ = plan.apply_with_subqueries(|node| {
        let verdict: Result<TreeNodeRecursion, Refusal> = (|| {
            match node {
                LogicalPlan::SubqueryAlias(sa) if is_view(&sa.input) => {
                    seen += 1;
                    return Ok(TreeNodeRecursion::Jump);
                }
                LogicalPlan::TableScan(scan) => {
                    let name = scan.table_name.table();
                    if project.tables.iter().any(|t| t == name) && views.contains_key(name) {
                        seen += 1;
                        return Ok(TreeNodeRecursion::Jump);
                    }
                    return Err(Refusal::new("unknown_table", format!("{name} is not one of this project's views ({})", project.tables.join(", "))));
                }
                LogicalPlan::Window(_) => return Err(window()),
                // Disclosure control counts patients on patient_id / patient_key:
                // no query may give those names to anything but themselves
                // (e.g. `date AS patient_id` would make one patient's events
                // look like many patients).
                LogicalPlan::Projection(p) => {
                    for e in &p.expr {
                        check_patient_name(e)?;
                    }
                }
                LogicalPlan::Aggregate(a) => {
                    for e in a.group_expr.iter().chain(&a.aggr_expr) {
                        check_patient_name(e)?;
                    }
                }
                LogicalPlan::Join(join) => {
                    // The SQL planner may put ON conditions in `on` or in
                    // `filter`; either way every condition must be
                    // patient_id = patient_id, and there must be one.
                    let on_patient = |e: &Expr| matches!(e, Expr::Column(c) if c.name == "patient_id");
                    let mut conditions: Vec<(Expr, Expr)> = join.on.clone();
                    let mut ok = true;
                    if let Some(filter) = &join.filter {
                        for conjunct in datafusion::logical_expr::utils::split_conjunction(filter) {
                            match conjunct {
                                Expr::BinaryExpr(b) if b.op == datafusion::logical_expr::Operator::Eq => conditions.push((*b.left.clone(), *b.right.clone())),
                                _ => ok = false,
                            }
                        }
                    }
                    if !ok || conditions.is_empty() || !conditions.iter().all(|(l, r)| on_patient(l) && on_patient(r)) {
                        return Err(Refusal::new(
                            "join_not_on_patient_id",
                            "tables may only be joined with JOIN … ON a.patient_id = b.patient_id (no other join conditions, no cross joins)",
                        ));
                    }
                }
                LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) | LogicalPlan::DescribeTable(_) => check_statement_kind(node).map(|_| ())?,
                LogicalPlan::Statement(_) | LogicalPlan::Dml(_) | LogicalPlan::Ddl(_) | LogicalPlan::Copy(_) => check_statement_kind(node).map(|_| ())?,
                LogicalPlan::Extension(_) | LogicalPlan::RecursiveQuery(_) | LogicalPlan::Unnest(_) => {
                    return Err(Refusal::new("unsupported_construct", "recursive queries, UNNEST and extensions are not available in the TRE"));
                }
                _ => {}
            }
            for e in node.expressions() {
                check_expression(&e)?;
            }
            Ok(TreeNodeRecursion::Continue)
        })();
        match verdict {
            Ok(r) => Ok(r),
            Err(r) => {
                refusal = Some(r);
                Ok(TreeNodeRecursion::Stop)
            }
        }
    });
    match refusal {
        Some(r) => Err(r),
        None => Ok(seen),
    }
}

fn check_patient_name(e: &Expr) -> Result<(), Refusal> {
    let name = match e {
        Expr::Alias(a) => a.name.clone(),
        Expr::Column(c) => c.name.clone(),
        other => other.schema_name().to_string(),
    };
    if name != "patient_id" && name != "patient_key" {
        return Ok(());
    }
    match e.clone().unalias() {
        Expr::Column(c) if c.name == name => Ok(()),
        _ => Err(Refusal::new(
            "patient_id_redefined",
            format!(
                "{name} may only name the views' own {name} column (disclosure control counts patients by it)"
            ),
        )),
    }
}

fn window() -> Refusal {
    Refusal::new(
        "window_function",
        "window functions can reveal individual rows and are not allowed",
    )
}

fn check_expression(e: &Expr) -> Result<(), Refusal> {
    let mut refusal = None;
    let _ = e.apply(|x| {
        let r = match x {
            Expr::WindowFunction(_) => Some(window()),
            Expr::AggregateFunction(af) => {
                let name = af.func.name().to_ascii_lowercase();
                if ROW_REVEALING.contains(&name.as_str()) {
                    Some(Refusal::new("row_revealing_aggregate", format!("{name}() can reveal a single patient's value and is not allowed; use count, sum, avg, stddev or variance")))
                } else if !ALLOWED_AGGREGATES.contains(&name.as_str()) {
                    Some(Refusal::new("aggregate_not_allowed", format!("{name}() is not on the list of allowed aggregates (count, sum, avg, stddev, variance)")))
                } else if af.params.filter.is_some() || !af.params.order_by.is_empty() {
                    Some(Refusal::new("aggregate_not_allowed", "FILTER and ORDER BY inside aggregates are not allowed"))
                } else {
                    None
                }
            }
            Expr::GroupingSet(_) => Some(Refusal::new("grouping_sets", "ROLLUP, CUBE and GROUPING SETS are not available")),
            _ => None,
        };
        match r {
            Some(r) => {
                refusal = Some(r);
                Ok(TreeNodeRecursion::Stop)
            }
            None => Ok(TreeNodeRecursion::Continue),
        }
    });
    refusal.map_or(Ok(()), Err)
}

fn not_aggregate() -> Refusal {
    Refusal::new(
        "not_an_aggregate",
        "results must be aggregates over patients (GROUP BY allowed keys with count, sum, avg…); row-level results are never released",
    )
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    Refusal::new(
        "unsupported_construct",
        format!("this query shape cannot be checked safely ({e})"),
    )
}

/// Checks the plan and rewrites it to carry each row's distinct-patient count.
pub fn check(
    plan: &LogicalPlan,
    views: &HashMap<String, LogicalPlan>,
    project: &Project,
) -> Result<Checked, Refusal> {
    check_statement_kind(plan)?;
    if walk(plan, views, project)? == 0 {
        return Err(Refusal::new(
            "no_patient_data",
            "the query reads none of the project's views",
        ));
    }
    let (plan, kinds) = rewrite(plan, views, project)?;
    Ok(Checked { plan, kinds })
}

fn rewrite(
    plan: &LogicalPlan,
    views: &HashMap<String, LogicalPlan>,
    project: &Project,
) -> Result<(LogicalPlan, Vec<ColumnKind>), Refusal> {
    match plan {
        LogicalPlan::Aggregate(a) => aggregate(a, project),
        LogicalPlan::Projection(p) => {
            let (input, kinds_in) = rewrite(&p.input, views, project)?;
            let schema = input.schema().clone();
            let mut kinds = Vec::with_capacity(p.expr.len());
            for e in &p.expr {
                let mut kind = ColumnKind::Key;
                for c in e.column_refs() {
                    if c.name.starts_with(HIDDEN) {
                        return Err(Refusal::new(
                            "reserved_name",
                            format!("names starting with {HIDDEN} are reserved"),
                        ));
                    }
                    let i = schema.index_of_column(c).map_err(internal)?;
                    kind = match (
                        kind,
                        kinds_in.get(i).copied().unwrap_or(ColumnKind::Statistic),
                    ) {
                        (_, ColumnKind::Count) | (ColumnKind::Count, _) => ColumnKind::Count,
                        (_, ColumnKind::Statistic) | (ColumnKind::Statistic, _) => {
                            ColumnKind::Statistic
                        }
                        _ => ColumnKind::Key,
                    };
                }
                kinds.push(kind);
            }
            let mut exprs = p.expr.clone();
            exprs.extend(
                schema
                    .iter()
                    .filter(|(_, f)| f.name().starts_with(HIDDEN))
                    .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name()))),
            );
            let projection = Projection::try_new(exprs, Arc::new(input)).map_err(internal)?;
            Ok((LogicalPlan::Projection(projection), kinds))
        }
        LogicalPlan::Filter(_) | LogicalPlan::Sort(_) | LogicalPlan::Limit(_) => {
            let input = plan.inputs()[0];
            let (new_input, kinds) = rewrite(input, views, project)?;
            let rebuilt = plan
                .with_new_exprs(plan.expressions(), vec![new_input])
                .map_err(internal)?;
            Ok((rebuilt, kinds))
        }
        LogicalPlan::SubqueryAlias(sa) if !views.values().any(|v| v == sa.input.as_ref()) => {
            let (input, kinds) = rewrite(&sa.input, views, project)?;
            let alias =
                SubqueryAlias::try_new(Arc::new(input), sa.alias.clone()).map_err(internal)?;
            Ok((LogicalPlan::SubqueryAlias(alias), kinds))
        }
        LogicalPlan::Union(u) => {
            let mut builder: Option<LogicalPlanBuilder> = None;
            let mut kinds: Vec<ColumnKind> = Vec::new();
            for input in &u.inputs {
                let (p, k) = rewrite(input, views, project)?;
                kinds = if kinds.is_empty() {
                    k
                } else {
                    kinds
                        .iter()
                        .zip(&k)
                        .map(|(a, b)| {
                            if a == b {
                                *a
                            } else if *a == ColumnKind::Count || *b == ColumnKind::Count {
                                ColumnKind::Count
                            } else {
                                ColumnKind::Statistic
                            }
                        })
                        .collect()
                };
                builder = Some(match builder {
                    None => LogicalPlanBuilder::from(p),
                    Some(b) => b.union(p).map_err(internal)?,
                });
            }
            let plan = builder
                .ok_or_else(not_aggregate)?
                .build()
                .map_err(internal)?;
            Ok((plan, kinds))
        }
        _ => Err(not_aggregate()),
    }
}

fn aggregate(a: &Aggregate, project: &Project) -> Result<(LogicalPlan, Vec<ColumnKind>), Refusal> {
    for g in &a.group_expr {
        match g {
            Expr::Column(c) if project.group_keys.contains(&c.name) => {}
            Expr::GroupingSet(_) => {
                return Err(Refusal::new(
                    "grouping_sets",
                    "ROLLUP, CUBE and GROUPING SETS are not available",
                ));
            }
            other => {
                return Err(Refusal::new(
                    "group_key_not_allowed",
                    format!(
                        "{} is not an allowed group key for this project (allowed: {})",
                        other.schema_name(),
                        project.group_keys.join(", ")
                    ),
                ));
            }
        }
    }
    // Count patients (up to what the threshold needs) on the integer
    // patient_key when the rows carry it (fast); otherwise on patient_id.
    let schema = a.input.schema();
    let find = |name: &str| {
        schema
            .iter()
            .find(|(_, f)| f.name() == name)
            .map(|(q, _)| Column::new(q.cloned(), name))
    };
    let patient = find("patient_key").or_else(|| find("patient_id")).ok_or_else(|| {
        Refusal::new(
            "no_patient_count",
            "the aggregated rows must carry patient_id so that every released cell can be checked against the disclosure threshold",
        )
    })?;
    let mut kinds: Vec<ColumnKind> = a.group_expr.iter().map(|_| ColumnKind::Key).collect();
    for e in &a.aggr_expr {
        let mut kind = ColumnKind::Statistic;
        let _ = e.apply(|x| {
            if let Expr::AggregateFunction(af) = x
                && af.func.name().eq_ignore_ascii_case("count")
            {
                kind = ColumnKind::Count;
            }
            Ok(TreeNodeRecursion::Continue)
        });
        kinds.push(kind);
    }
    let mut aggr = a.aggr_expr.clone();
    let cap = project.disclosure.redact_at_or_below + 1;
    aggr.push(patients_at_least(Expr::Column(patient), cap).alias(PATIENTS));
    if project.disclosure.checks_contributions() {
        // Every aggregate of the project gets the column (a constant 0 when
        // it has no sum or average), so UNION branches keep one shape.
        let mut summed = Vec::new();
        for e in &a.aggr_expr {
            let _ = e.apply(|x| {
                if let Expr::AggregateFunction(af) = x
                    && ["sum", "avg", "mean"]
                        .iter()
                        .any(|n| af.func.name().eq_ignore_ascii_case(n))
                {
                    summed.extend(af.params.args.iter().cloned());
                }
                Ok(TreeNodeRecursion::Continue)
            });
        }
        if summed.is_empty() {
            summed.push(datafusion::prelude::lit(0.0));
        }
        aggr.push(dominance(summed, &project.disclosure).alias(DOMINANCE));
    }
    let rewritten =
        Aggregate::try_new(a.input.clone(), a.group_expr.clone(), aggr).map_err(internal)?;
    Ok((LogicalPlan::Aggregate(rewritten), kinds))
}
